"""Built-in recipes by name (targets): ``--target cpu``, ``--recipe cpu-int8``, ``graphopt recipes``.

Each target is a recipe file in ``graphopt/recipes/`` that a user can print, copy and edit;
``cpu`` is the default job (``default`` names it too). The first comment block of each file
says what it is for.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from graphopt.errors import RecipeError

if TYPE_CHECKING:
    from graphopt.recipe import Recipe

FILES = {
    "cpu": "default.yaml",
    "cpu-int8": "cpu-int8.yaml",
    "cpu-int4": "cpu-int4.yaml",
    "gpu-fp16": "gpu-fp16.yaml",
    "gpu-int8": "gpu-int8.yaml",
    "gpu-int4": "gpu-int4.yaml",
    "size": "size.yaml",
}
ALIASES = {"default": "cpu"}


def canonical(name: str) -> str:
    """The target a name means (``default`` is ``cpu``); a RecipeError listing the targets otherwise."""
    name = ALIASES.get(name, name)
    if name not in FILES:
        raise RecipeError(f"unknown target {name!r}; the built-in targets are: {', '.join(FILES)}.")
    return name


def path(name: str) -> Path:
    """The recipe file of a built-in target."""
    return Path(str(resources.files("graphopt") / "recipes" / FILES[canonical(name)]))


def is_builtin(text: str) -> bool:
    """Whether ``--recipe TEXT`` names a built-in target rather than a file (a file of that name wins)."""
    return (text in FILES or text in ALIASES) and not Path(text).exists()


def summary(name: str) -> str:
    """The first comment block of the target's recipe file, as one paragraph."""
    lines = []
    for line in path(name).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").rstrip())
    return " ".join(lines)


def choices(plan: Recipe) -> list[str]:
    """What the recipe decides on this machine's CPU, and why: for the report of a target run."""
    from graphopt.passes.quantize.config import QuantizeConfig, resolve_reduce_range

    found = []
    for step in plan.passes:
        config = step.config
        if not isinstance(config, QuantizeConfig) or plan.device != "cpu":
            continue
        if config.weight_type == "int8":
            found.append(
                "7-bit weights: without VNNI, ORT's uint8 x int8 kernels add pairs of products in int16, which "
                "saturates"
                if resolve_reduce_range(config)
                else "8-bit weights: this CPU's int8 dot products (or reduce_range: false) keep the sums exact"
            )
        if config.activation_type == "uint8":
            found.append("uint8 activations: the input type of ORT's fast CPU integer kernels (u8s8)")
    if plan.budget.max_latency_ratio is not None and found:
        found.append(
            f"int8 only where it measured faster than float here (max_latency_ratio {plan.budget.max_latency_ratio:g}):"
            " the latency budget line says what was kept"
        )
    return list(dict.fromkeys(found))
