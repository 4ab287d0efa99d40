"""The literal table of passes a recipe can name: recipe name -> :class:`PassSpec`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import onnx_ir as ir

from graphopt.calibration.sources import DataSpec
from graphopt.errors import RecipeError
from graphopt.passes.fold.constants import FoldConfig, FoldConstantsPass
from graphopt.passes.fp16 import Float16Pass, Fp16Config, collect_magnitudes
from graphopt.passes.lora.merge import MergeLoraConfig, MergeLoraPass, UnmergeLoraConfig, UnmergeLoraPass
from graphopt.passes.prune.structured import (
    PruneStructuredConfig,
    PruneStructuredPass,
    collect_structured_statistics,
)
from graphopt.passes.prune.unstructured import (
    PruneConfig,
    PruneWeightsPass,
    collect_prune_statistics,
    prune_method_alternatives,
)
from graphopt.passes.quantize.static import QuantizeConfig, QuantizeQDQPass, collect_ranges, range_alternatives
from graphopt.passes.tune import TuneConfig, TuneForRuntimePass, measure
from graphopt.passes.weight_only.quantize import (
    WeightOnlyConfig,
    WeightOnlyQuantizePass,
    collect_hessians,
    method_alternatives,
)

# (model as it is when the pass runs, calibration data, pass config) -> statistics for the pass
Calibrator = Callable[[ir.Model, DataSpec, Any], Any]


@dataclass(frozen=True)
class PassSpec:
    """How to build one pass from a recipe entry.

    Attributes:
        name: The recipe name.
        pass_class: An onnx_ir pass; its constructor takes ``(config)`` or, with a
            calibrator, ``(config, statistics)``.
        config_class: Frozen dataclass of the options; each field's ``metadata["help"]``
            is its description.
        exact: True when the pass keeps outputs equal up to float rounding.
        calibrate: Collects the statistics the pass needs on the model as it is right
            before the pass runs; None for passes that need no data.
        changes_function: True for configs that change what the model computes on purpose
            (merging an external adapter): verification then compares with the model as
            it is after that step, not with the input.
        alternatives: Other configs of the same speed and size (e.g. other calibration
            methods) that the accuracy fallback tries, re-calibrated, before it keeps any
            layer in float.
        exclusion: The config field listing node names the pass leaves as they are; the
            accuracy fallback adds the layers it keeps in float (or dense) there. None: the
            fallback does not apply to this pass.
        exclusion_patterns: That field holds shell patterns (names are escaped into it).
    """

    name: str
    pass_class: type[ir.passes.PassBase]
    config_class: type
    exact: bool
    calibrate: Calibrator | None = None
    changes_function: Callable[[Any], bool] | None = None
    alternatives: Callable[[Any], list[Any]] | None = None
    exclusion: str | None = None
    exclusion_patterns: bool = False

    @property
    def needs_calibration(self) -> bool:
        return self.calibrate is not None

    @property
    def summary(self) -> str:
        doc = (self.pass_class.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else self.name

    def options(self) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, description) of every option."""
        rows = []
        for f in dataclasses.fields(self.config_class):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            rows.append((f.name, type_name, default, f.metadata.get("help", "")))
        return rows

    def build(self, config: Any, statistics: Any = None) -> ir.passes.PassBase:
        if self.calibrate is None:
            return self.pass_class(config)  # type: ignore[call-arg]
        return self.pass_class(config, statistics)  # type: ignore[call-arg]


def _uses_adapters(config: Any) -> bool:
    return bool(config.adapters)


REGISTRY: Mapping[str, PassSpec] = MappingProxyType(
    {
        "fold": PassSpec("fold", FoldConstantsPass, FoldConfig, exact=True),
        "merge_lora": PassSpec(
            "merge_lora", MergeLoraPass, MergeLoraConfig, exact=True, changes_function=_uses_adapters
        ),
        "unmerge_lora": PassSpec(
            "unmerge_lora", UnmergeLoraPass, UnmergeLoraConfig, exact=True, changes_function=_uses_adapters
        ),
        "quantize": PassSpec(
            "quantize",
            QuantizeQDQPass,
            QuantizeConfig,
            exact=False,
            calibrate=collect_ranges,
            alternatives=range_alternatives,
            exclusion="exclude_nodes",
        ),
        "tune": PassSpec("tune", TuneForRuntimePass, TuneConfig, exact=True, calibrate=measure),
        "fp16": PassSpec(
            "fp16", Float16Pass, Fp16Config, exact=False, calibrate=collect_magnitudes, exclusion="block_nodes"
        ),
        "prune": PassSpec(
            "prune",
            PruneWeightsPass,
            PruneConfig,
            exact=False,
            calibrate=collect_prune_statistics,
            alternatives=prune_method_alternatives,
            exclusion="exclude",
            exclusion_patterns=True,
        ),
        "prune_structured": PassSpec(
            "prune_structured",
            PruneStructuredPass,
            PruneStructuredConfig,
            exact=False,
            calibrate=collect_structured_statistics,
            exclusion="exclude",
            exclusion_patterns=True,
        ),
        "weight_only": PassSpec(
            "weight_only",
            WeightOnlyQuantizePass,
            WeightOnlyConfig,
            exact=False,
            calibrate=collect_hessians,
            alternatives=method_alternatives,
            exclusion="exclude_nodes",
        ),
    }
)


def get_spec(name: str) -> PassSpec:
    """The spec registered as ``name``, or a RecipeError listing the valid names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise RecipeError(f"unknown pass {name!r}; valid passes: {', '.join(sorted(REGISTRY))}.") from None
