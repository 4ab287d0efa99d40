"""Recipes: a YAML/JSON file (or mapping) -> validated pass configs and run settings.

Everything is validated before the model is touched: an unknown key, pass or option, or a
value of the wrong type is a :class:`RecipeError` that lists the valid choices.

    passes:
      - fold                      # defaults
      - fold: {iterations: 2}     # with options
    calibration: {data: calib.npz, samples: 128}
    verify: {data: null, samples: 16, batch_size: 4, dims: {batch: 4}, report_only: false}
    budget: {min_cosine: 0.999}
    device: cpu
    check: true                   # onnx.checker after every pass
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from graphopt import registry
from graphopt.budget import Budget
from graphopt.calibration.sources import DEFAULT_CALIBRATION_SAMPLES, DataSpec
from graphopt.errors import DataError, RecipeError
from graphopt.hardware import DEVICES


@dataclass(frozen=True)
class PassStep:
    """One pass of a pipeline: its spec and its config."""

    spec: registry.PassSpec
    config: Any

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True)
class FallbackSettings:
    """How the pipeline searches for layers to keep in float when the budget fails."""

    enabled: bool = True
    max_float_nodes: int = 32
    max_candidates: int = 48
    width: int = 8  # candidates re-measured per greedy step
    timed: int = 6  # equally small sets within budget timed against each other (0: take the first)
    # Seconds the search may run: each trial runs the whole model on the verification data, so on a
    # slow model (an autoregressive decoder) 48 ranking trials alone take many minutes.
    max_seconds: float = 300.0
    # Where no placement meets the accuracy budget, drop the lossy steps (the last first) and write what is left,
    # saying so, instead of failing the run (exit 1): the default job's "best model within budget".
    drop: bool = False

    def __post_init__(self) -> None:
        limits = (("max_float_nodes", 0), ("max_candidates", 0), ("width", 1), ("timed", 0), ("max_seconds", 0))
        for name, low in limits:
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be at least {low}; got {getattr(self, name)}.")


@dataclass(frozen=True)
class VerifySettings:
    """How the pipeline checks its output against the input model."""

    enabled: bool = True
    data: DataSpec = field(default_factory=lambda: DataSpec(samples=8, batch_size=1))
    report_only: bool = False
    latency_runs: int = 20
    threads: int | None = None
    layerwise: bool = True


@dataclass(frozen=True)
class Recipe:
    """A validated recipe."""

    passes: tuple[PassStep, ...]
    calibration: DataSpec | None = None
    verify: VerifySettings = field(default_factory=VerifySettings)
    budget: Budget = field(default_factory=Budget)
    device: str = "cpu"
    check: bool = False
    fallback: FallbackSettings = field(default_factory=FallbackSettings)
    target: str = ""  # the built-in target this recipe is (``graphopt.targets``), or empty


_TOP_KEYS = ("passes", "calibration", "verify", "budget", "fallback", "device", "check")
_DATA_KEYS = ("data", "samples", "batch_size", "seed", "dims")
_VERIFY_KEYS = (*_DATA_KEYS, "enabled", "report_only", "latency_runs", "threads", "layerwise")


def load_recipe(
    path: str | os.PathLike[str], *, known: registry.Registry = registry.REGISTRY, passes_given: bool = False
) -> Recipe:
    """Read and validate a recipe file (.yaml, .yml or .json).

    ``passes_given``: the passes come from elsewhere (``--pass``), so the file may hold settings only.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "is not a regular file" if path.exists() else "no such recipe file"
        raise RecipeError(f"{path}: {what}. Give a .yaml or .json recipe.")
    kind = "JSON" if path.suffix == ".json" else "YAML"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: is not UTF-8 text ({exc.reason} at byte {exc.start}). Save it as UTF-8.") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)
        data = data if data is not None else {}
        return parse_recipe(data, base_dir=path.parent, where=str(path), known=known, passes_given=passes_given)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise RecipeError(f"{path}: not valid {kind}: {exc}") from exc
    except RecursionError as exc:
        # No recipe nests more than a few levels; this is a broken or hostile file.
        raise RecipeError(f"{path}: nested too deeply to be a recipe. A recipe is a few levels of {kind}.") from exc


def parse_recipe(
    data: Mapping[str, Any],
    *,
    base_dir: Path | None = None,
    where: str = "recipe",
    known: registry.Registry = registry.REGISTRY,
    passes_given: bool = False,
) -> Recipe:
    """Validate a recipe given as a mapping; relative data paths resolve against ``base_dir``.

    ``known`` is the table pass names are looked up in (the built-in one, or one extended
    with :meth:`registry.Registry.with_passes`).
    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: must be a mapping with keys {', '.join(_TOP_KEYS)}; got {type(data).__name__}.")
    _check_keys(data, _TOP_KEYS, where)
    if "passes" not in data and not passes_given:
        raise RecipeError(f"{where}: has no 'passes' list. Add e.g. `passes: [fold]`, or give the passes with --pass.")
    passes = parse_passes(data["passes"], where=f"{where}: passes", known=known) if "passes" in data else ()
    device = data.get("device", "cpu")
    if device not in DEVICES:
        raise RecipeError(f"{where}: device {device!r} is not one of {', '.join(DEVICES)}.")
    calibration = None
    if data.get("calibration") is not None:
        calibration = _data_spec(
            data["calibration"], _DATA_KEYS, base_dir, f"{where}: calibration", samples=DEFAULT_CALIBRATION_SAMPLES
        )
    return Recipe(
        passes=passes,
        calibration=calibration,
        verify=_verify_settings(data.get("verify") or {}, base_dir, f"{where}: verify"),
        budget=make_dataclass(Budget, data.get("budget") or {}, f"{where}: budget"),
        fallback=make_dataclass(FallbackSettings, data.get("fallback") or {}, f"{where}: fallback"),
        device=device,
        check=_coerce(data.get("check", False), bool, f"{where}: check"),
    )


def parse_passes(
    entries: Any, *, where: str = "passes", known: registry.Registry = registry.REGISTRY
) -> tuple[PassStep, ...]:
    """Pass entries: a name, ``{name: {options}}``, ``{name: ..., options: {...}}`` or ``name:k=v,...``."""
    if isinstance(entries, (str, Mapping)) or not isinstance(entries, Sequence):
        raise RecipeError(f"{where}: must be a list of passes, e.g. [fold]; got {type(entries).__name__}.")
    return tuple(_parse_entry(entry, f"{where}[{i}]", known) for i, entry in enumerate(entries))


def _parse_entry(entry: Any, where: str, known: registry.Registry) -> PassStep:
    if isinstance(entry, PassStep):
        return entry
    if isinstance(entry, str):
        return parse_pass_arg(entry, known=known) if ":" in entry else make_step(entry, {}, where, known=known)
    if isinstance(entry, Mapping):
        if "name" in entry:
            _check_keys(entry, ("name", "options"), where)
            return make_step(entry["name"], entry.get("options") or {}, where, known=known)
        if len(entry) == 1:
            name, options = next(iter(entry.items()))
            return make_step(name, options or {}, where, known=known)
    raise RecipeError(f"{where}: expected a pass name or {{name: {{options}}}}; got {entry!r}.")


def parse_pass_arg(text: str, *, known: registry.Registry = registry.REGISTRY) -> PassStep:
    """A CLI ``--pass NAME[:k=v,k=v]`` argument; values are read as YAML scalars."""
    name, _, rest = text.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in _split_options(rest))):
        key, sep, value = item.partition("=")
        if not sep:
            raise RecipeError(f"--pass {text!r}: option {item!r} is not key=value.")
        try:
            options[key.strip()] = _scalar(value)
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise RecipeError(
                f"--pass {text!r}: option {key.strip()!r} has value {value!r}, which is not a plain YAML value "
                f"({problem}). Close its brackets, or quote it."
            ) from exc
    return make_step(name.strip(), options, f"--pass {text!r}", known=known)


class _Loader(yaml.SafeLoader):
    """YAML's safe loader without YAML 1.1's base-60 integers: ``pattern: 2:4`` is the text "2:4", not 124."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if not tag.endswith(":int")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(  # the same int forms, base 60 left out
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def _scalar(text: str) -> Any:
    """A CLI value: YAML, except that numbers YAML 1.1 leaves as strings (``1e40``) are numbers."""
    value = yaml.load(text, Loader=_Loader)
    if isinstance(value, str):
        for number in (int, float):
            try:
                return number(value)
            except ValueError:
                continue
    return value


def _split_options(text: str) -> list[str]:
    """Split on commas outside brackets so list values like ``ops=[Conv,Gemm]`` survive."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return [*parts, current]


def make_step(name: Any, options: Any, where: str, *, known: registry.Registry = registry.REGISTRY) -> PassStep:
    """Build a :class:`PassStep`, validating ``options`` against the pass's config."""
    if not isinstance(name, str):
        raise RecipeError(f"{where}: pass name must be a string; got {name!r}.")
    spec = known.get_spec(name)
    return PassStep(spec, make_dataclass(spec.config_type(), options, f"{where} ({name})"))


def make_dataclass(cls: type, options: Any, where: str) -> Any:
    """Instantiate a config dataclass from a mapping, checking every key and type."""
    if not isinstance(options, Mapping):
        raise RecipeError(f"{where}: options must be a mapping; got {options!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _check_keys(options, tuple(fields), where)
    hints = typing.get_type_hints(cls)
    values = {key: _coerce(value, hints[key], f"{where}: {key}") for key, value in options.items()}
    try:
        return cls(**values)
    except (ValueError, TypeError) as exc:
        raise RecipeError(f"{where}: {exc}") from exc


def _check_keys(data: Mapping[str, Any], valid: Sequence[str], where: str) -> None:
    unknown = [k for k in data if k not in valid]
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; valid keys: {', '.join(valid)}.")


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint; ints pass as floats, lists as tuples."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except RecipeError as exc:
                errors.append(str(exc))
        raise RecipeError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {hint}.")
    if origin is typing.Literal:
        if value in args:
            return value
        raise RecipeError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}.")
    if origin in (tuple, Sequence, list):
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            example = value if isinstance(value, str) and value else "A, B"
            raise RecipeError(
                f"{where}: expected a list; got {value!r}. Write lists in brackets: [{example}] "
                f"(on the command line: --pass NAME:OPTION=[{example}])."
            )
        return tuple(_coerce(v, args[0] if args else Any, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where}: expected a mapping; got {value!r}. Write mappings in braces: {{key: value}}.")
        return {str(k): _coerce(v, args[1] if args else Any, f"{where}.{k}") for k, v in value.items()}
    return _coerce_scalar(value, hint, where)


def _coerce_scalar(value: Any, hint: Any, where: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(hint, type) and isinstance(value, hint):
        return value
    name = getattr(hint, "__name__", str(hint))
    raise RecipeError(f"{where}: expected {name}; got {value!r} ({type(value).__name__}).")


def _data_spec(data: Any, keys: Sequence[str], base_dir: Path | None, where: str, *, samples: int) -> DataSpec:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: must be a mapping with keys {', '.join(keys)}.")
    _check_keys(data, keys, where)
    source = data.get("data")
    if source is not None:
        source = _coerce(source, str, f"{where}: data")
        source = str(base_dir / source) if base_dir is not None and not Path(source).is_absolute() else source
    try:
        return DataSpec(
            source=source,
            samples=_coerce(data.get("samples", samples), int, f"{where}: samples"),
            batch_size=_coerce(data.get("batch_size", 1), int, f"{where}: batch_size"),
            seed=_coerce(data.get("seed", 0), int, f"{where}: seed"),
            dims=_coerce(data.get("dims") or {}, dict[str, int], f"{where}: dims"),
        )
    except DataError as exc:  # a count out of range
        raise RecipeError(f"{where}: {exc}") from exc


def _verify_settings(data: Any, base_dir: Path | None, where: str) -> VerifySettings:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: must be a mapping with keys {', '.join(_VERIFY_KEYS)}.")
    _check_keys(data, _VERIFY_KEYS, where)
    return VerifySettings(
        enabled=_coerce(data.get("enabled", True), bool, f"{where}: enabled"),
        data=_data_spec({k: v for k, v in data.items() if k in _DATA_KEYS}, _DATA_KEYS, base_dir, where, samples=8),
        report_only=_coerce(data.get("report_only", False), bool, f"{where}: report_only"),
        latency_runs=_at_least(data.get("latency_runs", 20), 0, f"{where}: latency_runs"),
        threads=None if data.get("threads") is None else _at_least(data["threads"], 1, f"{where}: threads"),
        layerwise=_coerce(data.get("layerwise", True), bool, f"{where}: layerwise"),
    )


def _at_least(value: Any, low: int, where: str) -> int:
    number = _coerce(value, int, where)
    if number < low:
        raise RecipeError(f"{where}: must be at least {low}; got {number}.")
    return number
