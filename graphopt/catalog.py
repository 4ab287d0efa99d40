"""``graphopt passes [NAME]`` and ``graphopt recipes [NAME]``: the catalogue, for an 80-column terminal, without ONNX.

Options are read from the config dataclasses and summaries from the pass classes' source, so
listing passes imports no pass code (the registry names them by module path).
"""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Sequence

from graphopt import registry
from graphopt.errors import RecipeError

WIDTH = 80


def _wrap(text: str, indent: int) -> list[str]:
    pad = " " * indent
    return textwrap.wrap(text, WIDTH, initial_indent=pad, subsequent_indent=pad) or [pad.rstrip()]


def _kind(spec: registry.PassSpec) -> str:
    return "exact" if spec.exact else "lossy"


def overview(known: registry.Registry = registry.REGISTRY) -> list[str]:
    """Every pass in a few lines: kind, summary, when it reads data, its option names."""
    lines: list[str] = []
    for name, spec in known.items():
        lines.append(f"{name} ({_kind(spec)})")
        lines += _wrap(spec.summary, 2)
        if spec.data:
            lines += _wrap(f"calibration data: {spec.data}", 2)
        lines += _wrap("options: " + ", ".join(option for option, *_ in spec.options()), 2)
        lines.append("")
    lines += _wrap("graphopt passes NAME prints one pass with every option's type, default and description.", 0)
    return lines


def details(name: str, known: registry.Registry = registry.REGISTRY) -> list[str]:
    """One pass in full: every option with its type, default and description, and how to use it."""
    if name not in known:
        raise RecipeError(f"unknown pass {name!r}; the passes are: {', '.join(known)}.")
    spec = known[name]
    lines = [f"{name} ({_kind(spec)})", *_wrap(spec.summary, 2), ""]
    lines += [*_wrap(f"calibration data: {spec.data or 'never read'}", 2), ""]
    options = spec.options()
    lines.append("options:")
    for option, type_name, default, text in options:
        lines += _wrap(f"{option}: {type_name} = {default!r}", 2)
        lines += _wrap(text, 6)
    example = next(((o, d) for o, t, d, _ in options if isinstance(d, (bool, int, float, str))), None)
    lines += ["", "examples:", f"  graphopt optimize in.onnx -o out.onnx --pass {name}"]
    if example is not None:
        option, default = example
        value = str(default).lower() if isinstance(default, bool) else default
        lines.append(f"  graphopt optimize in.onnx -o out.onnx --pass {name}:{option}={value}")
        lines += ["  recipe:  passes:", f"             - {name}: {{{option}: {value}}}"]
    lines += _wrap("list options take brackets: exclude_op_types=[Softmax,Gather]", 2)
    return lines


def print_recipes(names: Sequence[str]) -> int:
    """The built-in recipes with what each is for; with names, those files as they are (to copy and edit)."""
    from graphopt import targets

    if names:
        texts = [targets.path(n).read_text(encoding="utf-8").rstrip() for n in names]
        return _emit(["\n\n".join(texts)])
    lines: list[str] = []
    for name in targets.FILES:
        aliases = [a for a, t in targets.ALIASES.items() if t == name]
        lines.append(name + (f" (also: {', '.join(aliases)})" if aliases else ""))
        lines += [*_wrap(targets.summary(name), 2), ""]
    lines += _wrap("graphopt recipes NAME prints one; --target NAME (or --recipe NAME) runs it.", 0)
    return _emit(lines)


def _emit(lines: Sequence[str]) -> int:
    try:
        print("\n".join(lines).rstrip(), flush=True)
    except BrokenPipeError:  # `graphopt passes | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def print_passes(names: Sequence[str], known: registry.Registry = registry.REGISTRY) -> int:
    lines = overview(known) if not names else [line for n in names for line in (*details(n, known), "")]
    return _emit(lines)
