"""Merge LoRA adapters into the base weights, so the model runs at the base model's cost.

Two sources of adapters, in this order:

1. LoRA branches an exporter left in the graph (see :mod:`graphopt.passes.lora.branch`);
2. PEFT adapter folders, merged into a model exported from the base model without LoRA
   (see :mod:`graphopt.passes.lora.external`); several adapters combine with weights.

``unmerge_lora`` subtracts the same folders again. The model remembers which adapter
combinations it holds (``graphopt.lora`` in its metadata), so merging an adapter twice, or
unmerging one twice, does nothing the second time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from graphopt.errors import DataError
from graphopt.passes.lora import quantized as lora_quantized
from graphopt.passes.lora.adapters import Adapter, LoraFactors, combine, load_adapter
from graphopt.passes.lora.branch import BranchMerger, merge_branches
from graphopt.passes.lora.config import AdapterOptions, MergeLoraConfig, UnmergeLoraConfig
from graphopt.passes.lora.external import ExternalMerge, resolve, unmatched_error, weighted_targets
from graphopt.passes.lora.targets import Target, WeightAccess, float_weight, locate_weight

logger = logging.getLogger(__name__)

LEDGER_KEY = "graphopt.lora"
_KEEP = "keep_branch: the quantized base keeps its LoRA in float beside it"


@dataclass(frozen=True)
class WeightPolicy:
    """Which base weights may be edited, following the pass options."""

    copy_shared: bool = False
    keep_quantized: bool = False

    def problem(self, target: Target) -> str | None:
        """Why ``target``'s weight must not be edited under these options, or None."""
        if target.quantized:
            return _KEEP if self.keep_quantized else lora_quantized.quantized_problem(target)
        located = locate_weight(target)
        if isinstance(located, str):
            return located
        if not located[2] and not self.copy_shared:
            return f"weight {located[0].name} is also read by other nodes (shared_weights='copy' gives the op a copy)"
        return None

    def open(self, target: Target) -> WeightAccess | str:
        """Write access to ``target``'s weight (a copy of a shared one, with ``copy_shared``), or why not."""
        problem = self.problem(target)
        if problem:
            return problem
        if target.quantized:
            return lora_quantized.quantized_weight(target)
        return float_weight(target, copy_shared=self.copy_shared)


class MergeLoraPass(ir.passes.InPlacePass):
    """Merge LoRA adapters (branches in the graph, or PEFT adapter folders) into the base weights.

    Each LoRA ``s·x·A·B`` becomes ``W' = W + s·(A·B)`` in the layout the base op reads
    (MatMul, Gemm with transB/alpha, Conv, a column range of a fused QKV projection), and the
    branch is removed; quantized bases are dequantized, updated and quantized again in
    their own format (or keep a float branch, by option). A weight that other nodes read
    too is never changed. Graph inputs and outputs keep their names, types and shapes.
    Branches inside subgraphs (If/Loop bodies) are merged; functions are left alone.

    Attributes:
        config: The pass options.
        details: What the last run did (for the report).
    """

    def __init__(self, config: MergeLoraConfig | None = None) -> None:
        super().__init__()
        self.config = config or MergeLoraConfig()
        self.details: dict[str, object] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        config = self.config
        policy = WeightPolicy(config.shared_weights == "copy", config.quantized == "keep_branch")
        self.details = {}
        changed = 0
        if config.in_graph:
            merger = BranchMerger(policy)
            changed += merge_branches(model, merger)
            self.details.update(
                branches_merged=dict(merger.merged),
                branches_left=dict(merger.skipped),
                weights_changed=len(merger.changed),
            )
            _add_requantization(self.details, merger.requantization)
        if config.adapters:
            insert = lora_quantized.insert_float_branch if policy.keep_quantized else None
            changed += apply_adapters(model, config, 1.0, ExternalMerge(policy, insert), self.details)
        logger.debug("merge_lora: %s", self.details)
        return ir.passes.PassResult(model, modified=bool(changed))


class UnmergeLoraPass(ir.passes.InPlacePass):
    """Subtract PEFT adapters from the base weights: the reverse of ``merge_lora`` with the same folders.

    Float and quantized (re-quantized) weights are handled as ``merge_lora`` handles them;
    graph inputs and outputs are preserved; only weights change, no node is added or removed.

    Attributes:
        config: The pass options.
        details: What the last run did (for the report).
    """

    def __init__(self, config: UnmergeLoraConfig) -> None:
        super().__init__()
        self.config = config
        self.details: dict[str, object] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.details = {}
        changed = apply_adapters(model, self.config, -1.0, ExternalMerge(WeightPolicy()), self.details)
        return ir.passes.PassResult(model, modified=bool(changed))


def apply_adapters(
    model: ir.Model, config: AdapterOptions, sign: float, merge: ExternalMerge, details: dict[str, object]
) -> int:
    """Add (sign 1) or subtract (sign -1) the configured adapters; fill ``details``; count edits."""
    adapters = [load_adapter(path) for path in config.adapters]
    weights = tuple(config.weights) or (1.0,) * len(adapters)
    key = _ledger_key(adapters, weights, config.combination)
    ledger = _read_ledger(model)
    details["adapters"] = [_describe(a, w) for a, w in zip(adapters, weights, strict=True)]
    # +1: merged, -1: subtracted from a model that had it baked in, 0: merged then unmerged.
    state = ledger.get(key)
    if state == (1 if sign > 0 else -1) or (sign < 0 and state == 0):
        done = "merged into" if sign > 0 else "subtracted from"
        logger.info("%s: these adapters are already %s this model; nothing to do", config.pass_name, done)
        details["skipped"] = f"already {done} the model (its metadata {LEDGER_KEY})"
        return 0
    factors = combine(adapters, weights, config.combination)
    matched = _matched_modules(model, config, adapters, factors, merge, details)
    count = merge.apply(matched, factors, sign)
    if count:
        ledger[key] = ledger.get(key, 0) + (1 if sign > 0 else -1)
        _write_ledger(model, ledger)
    details["modules_merged"] = dict(merge.merged)
    details["weights_changed"] = int(details.get("weights_changed", 0)) + len(merge.changed)  # type: ignore[call-overload]
    _add_requantization(details, merge.requantization)
    return count


def _matched_modules(
    model: ir.Model,
    config: AdapterOptions,
    adapters: Sequence[Adapter],
    factors: Mapping[str, LoraFactors],
    merge: ExternalMerge,
    details: dict[str, object],
) -> dict[str, Target]:
    """The ops each adapter module merges into; a DataError for what cannot be merged (unless allowed)."""
    name = config.pass_name
    unsupported = sorted({k for a in adapters for k in a.unsupported})
    if unsupported and not config.allow_unmatched:
        raise DataError(
            f"{name}: the adapter holds tensors that are not LoRA A/B pairs: {', '.join(unsupported[:8])}"
            f"{' ...' if len(unsupported) > 8 else ''} (embedding LoRA, modules_to_save). "
            "Set allow_unmatched to merge the LoRA pairs only."
        )
    targets = weighted_targets(model.graph)
    matched, unmatched = resolve(sorted(factors), targets, _mapping(config))
    if unmatched and not config.allow_unmatched:
        raise unmatched_error(unmatched, targets)
    problems = merge.problems(matched, factors)
    if problems and not config.allow_unmatched:
        listed = "; ".join(f"{m}: {p}" for m, p in sorted(problems.items()))
        raise DataError(f"{name}: {len(problems)} module(s) cannot be merged: {listed}.")
    for module in problems:
        matched.pop(module)
    details.update(
        modules_matched=len(matched), modules_unmatched=unmatched + sorted(problems), unsupported_keys=unsupported
    )
    return matched


def _describe(adapter: Adapter, weight: float) -> dict[str, object]:
    scales = sorted(set(adapter.scaling.values()))
    return {"path": str(adapter.path), "modules": len(adapter.factors), "weight": weight, "scaling": scales[:4]}


def _add_requantization(details: dict[str, object], stats: Mapping[str, Mapping[str, float]]) -> None:
    if not stats:
        return
    table = dict(details.get("requantization", {}))  # type: ignore[call-overload]
    table.update({name: dict(values) for name, values in stats.items()})
    details["requantization"] = table
    details["requantization_max_abs_err"] = max(v.get("max_abs_err", 0.0) for v in table.values())


def _mapping(config: AdapterOptions) -> dict[str, str]:
    mapping: dict[str, str] = {}
    if config.mapping_file is not None:
        path = Path(config.mapping_file)
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"merge_lora: mapping_file {path} cannot be read as JSON ({exc}).") from exc
        if not isinstance(loaded, dict) or not all(isinstance(v, str) for v in loaded.values()):
            raise DataError(f"merge_lora: mapping_file {path} must be a JSON object of strings: {{module: name}}.")
        mapping.update(loaded)
    mapping.update(config.mapping)
    return mapping


def _ledger_key(adapters: Sequence[Adapter], weights: Sequence[float], combination: str) -> str:
    text = json.dumps([[a.digest for a in adapters], list(weights), combination])
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _read_ledger(model: ir.Model) -> dict[str, int]:
    try:
        ledger = json.loads(model.metadata_props.get(LEDGER_KEY, "{}"))
    except ValueError:
        return {}
    return {str(k): int(v) for k, v in ledger.items()} if isinstance(ledger, dict) else {}


def _write_ledger(model: ir.Model, ledger: Mapping[str, int]) -> None:
    model.metadata_props[LEDGER_KEY] = json.dumps(dict(ledger), sort_keys=True)
