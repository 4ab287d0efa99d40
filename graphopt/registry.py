"""The table of passes a recipe can name: recipe name -> :class:`PassSpec`.

Passes, configs and calibrators are named by module path (``"package.module:Name"``) and
imported on first use, so parsing a recipe or printing ``--help`` loads no pass and no ONNX
Runtime. A spec may also hold the objects themselves: that is how a test or a user's own
code registers a pass (:meth:`Registry.with_passes`), without touching the built-in table.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import importlib
import importlib.util
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphopt.errors import RecipeError

if TYPE_CHECKING:  # annotations only: importing the registry must not load ONNX
    import onnx_ir as ir

# (model as it is when the pass runs, calibration data, pass config) -> statistics for the pass
Calibrator = Callable[[Any, Any, Any], Any]


def resolve(target: Any) -> Any:
    """``"package.module:Name"`` imported, or ``target`` itself when it is not a string."""
    if not isinstance(target, str):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Lossy:
    """The contract between a lossy pass, the accuracy fallback and the report.

    Every lossy config has ``exclude`` (shell patterns of node or weight names the pass leaves
    as they are, matched by :func:`graphopt.passes.edit.excluded`) and ``exclude_op_types``.

    Attributes:
        alternatives: ``config -> [configs]`` of the same size and speed (other calibration
            methods) that the fallback tries, re-calibrated, before it leaves any node alone.
        faster: ``config -> [configs]`` that place the same work differently and may run faster
            (quantize every listed op, so that ONNX Runtime fuses more): the latency budget
            times them, re-calibrated and checked for accuracy, before it puts layers back to float.
        wider: ``config -> [configs]`` that keep every layer compressed but some at more bits (mixed
            precision), least first: the fallback tries them, in order, after the same-size
            alternatives and before it leaves any node alone.
        tensors: The config also has ``exclude_tensors`` (activations left unquantized).
        op_types: The config's ``op_types`` narrows which nodes the fallback may leave alone.
        kept: How the report words a node the pass left alone ("in float", "dense").
    """

    alternatives: str | Callable[[Any], list[Any]] | None = None
    faster: str | Callable[[Any], list[Any]] | None = None
    wider: str | Callable[[Any], list[Any]] | None = None
    tensors: bool = False
    op_types: bool = False
    kept: str = "in float"


def _class_docstring(path: str) -> str:
    """The docstring of ``module:Class`` from the module's source (importing a pass module loads ONNX)."""
    module, _, name = path.partition(":")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return ""
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    found = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), None)
    return (ast.get_docstring(found) or "") if found is not None else ""


@dataclass(frozen=True)
class PassSpec:
    """How to build one pass from a recipe entry.

    Attributes:
        name: The recipe name.
        pass_class: An onnx_ir pass (or its module path); its constructor takes ``(config)``
            or, with a calibrator, ``(config, statistics)``.
        config_class: Frozen dataclass of the options (or its module path); each field's
            ``metadata["help"]`` is its description.
        calibrate: Collects the statistics the pass needs on the model as it is right before
            the pass runs; None for passes that need no data.
        lossy: The fallback contract of a lossy pass; None for exact passes (outputs equal up
            to float rounding).
        changes_function: A config field that, when set, means the pass changes what the
            model computes on purpose (merging an external adapter): verification then
            compares with the model as it is after that step, not with the input.
        min_opset: ``config -> opset`` the pass works best at; the pipeline converts older
            models to it first (when the conversion keeps the outputs equal).
        data: When the pass reads calibration data, in the words of its options (for
            ``graphopt passes``); empty for passes that never do.
    """

    name: str
    pass_class: str | type[ir.passes.PassBase]
    config_class: str | type
    calibrate: str | Calibrator | None = None
    lossy: Lossy | None = None
    changes_function: str | None = None
    min_opset: str | Callable[[Any], int] | None = None
    data: str = ""

    @property
    def exact(self) -> bool:
        return self.lossy is None

    @property
    def needs_calibration(self) -> bool:
        return self.calibrate is not None

    @property
    def summary(self) -> str:
        """The first line of the pass class's docstring, read from its source without importing it."""
        cls = self.pass_class
        doc = (_class_docstring(cls) if isinstance(cls, str) else cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else self.name

    def needs_data(self, config: Any) -> bool:
        """Whether ``config`` cannot run without calibration data (a config's ``needs_data``, if it has one)."""
        return bool(getattr(config, "needs_data", False))

    def without_data(self, config: Any) -> str:
        """What ``config`` does differently without calibration data (a config's ``without_data``), or ""."""
        return str(getattr(config, "without_data", ""))

    def config_type(self) -> type:
        return resolve(self.config_class)

    def options(self) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, description) of every option."""
        rows = []
        for f in dataclasses.fields(self.config_type()):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            rows.append((f.name, type_name, default, f.metadata.get("help", "")))
        return rows

    def collect(self, model: ir.Model, data: Any, config: Any) -> Any:
        """The pass's statistics on ``model`` (None for passes without a calibrator)."""
        return None if self.calibrate is None else resolve(self.calibrate)(model, data, config)

    def build(self, config: Any, statistics: Any = None) -> ir.passes.PassBase:
        cls = resolve(self.pass_class)
        return cls(config) if self.calibrate is None else cls(config, statistics)

    def apply(self, model: ir.Model, config: Any, statistics: Any = None) -> tuple[ir.passes.PassBase, Any]:
        """Build the pass and run it on ``model`` in place: (the pass, its PassResult).

        Graph inputs with a default initializer are inputs to the pass (never folded into the graph).
        """
        from graphopt.passes import edit  # on first use: parsing a recipe loads no pass code

        pass_ = self.build(config, statistics)
        with edit.overridable_inputs_hidden(model):
            result = pass_(model)
        return pass_, result

    def opset_for(self, config: Any) -> int:
        """The opset this config wants the model at (0: any)."""
        return 0 if self.min_opset is None else int(resolve(self.min_opset)(config))

    def changes_function_for(self, config: Any) -> bool:
        return self.changes_function is not None and bool(getattr(config, self.changes_function))

    def alternatives(self, config: Any) -> list[Any]:
        """Same-size configs the accuracy fallback tries before leaving nodes alone."""
        if self.lossy is None or self.lossy.alternatives is None:
            return []
        return list(resolve(self.lossy.alternatives)(config))

    def faster(self, config: Any) -> list[Any]:
        """Configs that may run faster than ``config`` (the latency budget times them)."""
        if self.lossy is None or self.lossy.faster is None:
            return []
        return list(resolve(self.lossy.faster)(config))

    def wider(self, config: Any) -> list[Any]:
        """Configs that store more of the layers at more bits, least first (the fallback tries them in order)."""
        if self.lossy is None or self.lossy.wider is None:
            return []
        return list(resolve(self.lossy.wider)(config))

    def with_excluded(self, config: Any, excluded: Sequence[str]) -> Any:
        """``config`` with node names added to ``exclude`` and ``tensor:NAME`` entries to ``exclude_tensors``."""
        if self.lossy is None:
            raise ValueError(f"pass {self.name!r} is exact; nothing of it can be excluded")
        nodes = tuple(glob.escape(e) for e in excluded if not e.startswith("tensor:"))
        tensors = tuple(e.removeprefix("tensor:") for e in excluded if e.startswith("tensor:"))
        changes: dict[str, tuple[str, ...]] = {"exclude": (*config.exclude, *nodes)}
        if tensors and self.lossy.tensors:
            changes["exclude_tensors"] = (*config.exclude_tensors, *tensors)
        return dataclasses.replace(config, **changes)


class Registry(Mapping[str, PassSpec]):
    """Pass specs by recipe name; immutable: :meth:`with_passes` returns an extended copy."""

    def __init__(self, specs: Iterable[PassSpec]) -> None:
        self._specs = {spec.name: spec for spec in specs}

    def __getitem__(self, name: str) -> PassSpec:
        return self._specs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def get_spec(self, name: str) -> PassSpec:
        """The spec registered as ``name``, or a RecipeError listing the valid names."""
        try:
            return self._specs[name]
        except KeyError:
            raise RecipeError(f"unknown pass {name!r}; valid passes: {', '.join(sorted(self._specs))}.") from None

    def with_passes(self, *specs: PassSpec) -> Registry:
        """A registry with ``specs`` added (replacing built-in ones of the same name)."""
        return Registry([*self._specs.values(), *specs])


_P = "graphopt.passes"
_CAL = "graphopt.calibration"

REGISTRY = Registry(
    [
        PassSpec("fold", f"{_P}.fold.constants:FoldConstantsPass", f"{_P}.fold.config:FoldConfig"),
        PassSpec(
            "merge_lora",
            f"{_P}.lora.merge:MergeLoraPass",
            f"{_P}.lora.config:MergeLoraConfig",
            changes_function="adapters",
        ),
        PassSpec(
            "unmerge_lora",
            f"{_P}.lora.merge:UnmergeLoraPass",
            f"{_P}.lora.config:UnmergeLoraConfig",
            changes_function="adapters",
        ),
        PassSpec(
            "quantize",
            f"{_P}.quantize.static:QuantizeQDQPass",
            f"{_P}.quantize.config:QuantizeConfig",
            calibrate=f"{_P}.quantize.calibrate:collect_ranges",
            lossy=Lossy(
                f"{_P}.quantize.config:range_alternatives",
                faster=f"{_P}.quantize.config:fusing_alternatives",
                tensors=True,
                op_types=True,
            ),
            min_opset=f"{_P}.quantize.config:min_opset",
            data="mode=static, or mode=auto when data is given (auto without data quantizes dynamically)",
        ),
        PassSpec(
            "tune",
            f"{_P}.tune:TuneForRuntimePass",
            f"{_P}.options:TuneConfig",
            calibrate=f"{_CAL}.timing:measure",
            data="optional: times one batch of it (seeded random inputs otherwise)",
        ),
        PassSpec(
            "fp16",
            f"{_P}.fp16:Float16Pass",
            f"{_P}.options:Fp16Config",
            calibrate=f"{_CAL}.magnitudes:collect_magnitudes",
            lossy=Lossy(kept="in float32"),
            data="optional: with data, nodes touching values beyond max_abs stay float32",
        ),
        PassSpec(
            "prune",
            f"{_P}.prune.unstructured:PruneWeightsPass",
            f"{_P}.prune.config:PruneConfig",
            calibrate=f"{_P}.prune.unstructured:collect_prune_statistics",
            lossy=Lossy(f"{_P}.prune.config:prune_method_alternatives", op_types=True, kept="dense"),
            data="method=wanda or method=sparsegpt",
        ),
        PassSpec(
            "prune_structured",
            f"{_P}.prune.structured:PruneStructuredPass",
            f"{_P}.prune.config:PruneStructuredConfig",
            calibrate=f"{_P}.prune.structured:collect_structured_statistics",
            lossy=Lossy(kept="whole"),
            data="recover=true or importance=activation",
        ),
        PassSpec(
            "weight_only",
            f"{_P}.weight_only.quantize:WeightOnlyQuantizePass",
            f"{_P}.weight_only.config:WeightOnlyConfig",
            calibrate=f"{_P}.weight_only.gptq:collect_hessians",
            lossy=Lossy(
                f"{_P}.weight_only.config:method_alternatives",
                wider=f"{_P}.weight_only.config:wider_alternatives",
                op_types=True,
            ),
            data="method=gptq (method=auto and awq=true, when data is given)",
        ),
    ]
)


def get_spec(name: str) -> PassSpec:
    """The built-in spec registered as ``name``, or a RecipeError listing the valid names."""
    return REGISTRY.get_spec(name)
