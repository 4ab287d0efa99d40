"""Structured pruning: remove whole Conv channels, MLP neurons and attention heads."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.calibration.sources import require_data
from graphopt.errors import PassError
from graphopt.passes.edit import infer_types, trans_b
from graphopt.passes.prune import recovery as prune_recovery
from graphopt.passes.prune import scoring as prune_scoring
from graphopt.passes.prune.calibration import LayerStatistics, collect_layer_statistics, layer_key
from graphopt.passes.prune.config import PruneStructuredConfig
from graphopt.passes.prune.groups import ChannelGroup, GroupFinder, consumer_weight_axis, producer_weight_axis
from graphopt.passes.prune.recovery import RecoveryStatistics
from graphopt.passes.prune.surgery import prune_group

logger = logging.getLogger(__name__)

# Where the channel counts before the first pruning are kept, so a second run knows its
# target was reached (the pass is idempotent) instead of pruning again.
HISTORY_KEY = "graphopt.prune_structured.channels"


@dataclass
class StructuredStatistics:
    """Calibration results: consumer input energy (importance) and re-fit normal equations."""

    energy: dict[str, LayerStatistics] = field(default_factory=dict)
    recovery: dict[str, RecoveryStatistics] = field(default_factory=dict)


def find_groups(model: ir.Model, config: PruneStructuredConfig) -> list[ChannelGroup]:
    """Channel groups of the main graph (shapes are inferred first: the rules need them)."""
    # Inferred on a copy, only missing main-graph tensor types/shapes copied back: ONNX's
    # inference can type sequence values as tensors, which ORT then refuses.
    infer_types(model)
    return GroupFinder(config.excluded).find_all(model.graph)


def _history(model: ir.Model) -> dict[str, int]:
    try:
        return dict(json.loads(model.metadata_props.get(HISTORY_KEY, "{}")))
    except (ValueError, TypeError):
        return {}


def plan(
    model: ir.Model,
    groups: list[ChannelGroup],
    config: PruneStructuredConfig,
    energy: Mapping[str, LayerStatistics],
) -> list[tuple[ChannelGroup, np.ndarray]]:
    """The channels to keep in each group that the config selects and has channels to lose."""
    history = _history(model)
    chosen = []
    for group in groups:
        if group.failure or group.kind not in config.kinds:
            continue
        if config.residual == "skip" and len(group.producers) > 1:
            logger.debug("prune_structured: %s is tied by a residual; skipped (residual=skip)", group.name)
            continue
        original = history.get(group.name, group.channels)
        keep = _rounded(original - round(config.ratio * original), group.granularity, config.round_to)
        if keep >= group.channels:
            continue
        scores = channel_scores(group, config, energy)
        kept = np.sort(np.argsort(-scores, kind="stable")[:keep])
        chosen.append((group, kept))
    return chosen


def _rounded(keep: int, unit: int, round_to: int) -> int:
    """``keep`` moved to the nearest count whose width (channels x unit) is a multiple of ``round_to``."""
    step = round_to // math.gcd(round_to, unit)
    return max(step, round(keep / step) * step)


def channel_scores(
    group: ChannelGroup, config: PruneStructuredConfig, energy: Mapping[str, LayerStatistics]
) -> np.ndarray:
    """One importance score per channel; each layer's share is normalised so layers weigh alike."""
    total = np.zeros(group.channels)
    if config.importance == "activation":
        for node, member in group.consumers:
            stats = energy.get(layer_key(node))
            if stats is not None:
                total += _normalised(_per_channel(group, member.scale, _contribution(node, stats)))
        return total
    ends = [(n, m, producer_weight_axis(n)) for n, m in group.producers]
    ends += [(n, m, consumer_weight_axis(n)) for n, m in group.consumers]
    for node, member, axis in ends:
        weight = node.inputs[1].const_value.numpy().astype(np.float64)  # type: ignore[union-attr]
        squares = np.moveaxis(weight**2, axis, 0).reshape(weight.shape[axis], -1).sum(axis=1)
        total += _normalised(_per_channel(group, member.scale, squares))
    return total


def _contribution(node: ir.Node, stats: LayerStatistics) -> np.ndarray:
    """E[x^2] times the squared weight column, per input element of a consumer."""
    rows = prune_scoring.weight_rows(node.op_type, node.inputs[1].const_value.numpy(), trans_b=trans_b(node))  # type: ignore[union-attr]
    per_column = stats.sum_squares * (rows.astype(np.float64) ** 2).sum(axis=0)
    if node.op_type == "Conv":  # columns are (kernel position, channel): sum over positions
        channels = node.inputs[1].const_value.shape[1]  # type: ignore[union-attr]
        per_column = per_column.reshape(-1, channels).sum(axis=0)
    return per_column


def _per_channel(group: ChannelGroup, scale: object, per_element: np.ndarray) -> np.ndarray:
    return per_element.reshape(group.channels, group.unit(scale)).sum(axis=1)  # type: ignore[arg-type]


def _normalised(scores: np.ndarray) -> np.ndarray:
    mean = float(np.mean(scores))
    return scores / mean if mean > 0 else scores


def apply_plan(
    model: ir.Model, chosen: list[tuple[ChannelGroup, np.ndarray]], taken: set[str]
) -> dict[str, np.ndarray]:
    """Prune every chosen group; record original channel counts; return kept outputs per producer."""
    history = _history(model)
    kept_outputs: dict[str, np.ndarray] = {}
    for group, kept in chosen:
        history.setdefault(group.name, group.channels)
        kept_outputs.update(prune_group(model.graph, group, kept, taken))
    if chosen:
        model.metadata_props[HISTORY_KEY] = json.dumps(history, sort_keys=True)
    return kept_outputs


def collect_structured_statistics(model: ir.Model, data: object, config: PruneStructuredConfig) -> StructuredStatistics:
    """Calibrate importance and re-fit statistics (the registry runs this before the pass).

    With ``recover``, the pruning plan is applied to a copy of the model and both models
    run side by side, so each consumer is fitted on the inputs it will really see.
    """
    if not config.needs_data:
        return StructuredStatistics()
    groups = find_groups(model, config)
    candidates = [g for g in groups if not g.failure and g.kind in config.kinds]
    if not candidates:
        return StructuredStatistics()
    spec = require_data(data, "prune_structured")  # type: ignore[arg-type]
    energy = {}
    if config.importance == "activation":
        consumers = [node for group in candidates for node, _ in group.consumers]
        energy = collect_layer_statistics(model, spec, consumers, gram=False)
    if not config.recover:
        return StructuredStatistics(energy)
    pruned = model.clone()
    chosen = plan(pruned, find_groups(pruned, config), config, energy)
    taken: set[str] = set()
    kept_outputs = apply_plan(pruned, chosen, taken)
    consumers = list({id(n): n for group, _ in chosen for n, _ in group.consumers}.values())
    recovery: dict[str, RecoveryStatistics] = {}
    # Stage by stage, so each consumer is fitted on inputs from already re-fitted layers.
    for stage in prune_recovery.stages(pruned.graph, consumers):
        found = prune_recovery.collect_recovery(model, pruned, spec, stage, kept_outputs)
        for node in stage:
            if layer_key(node) in found:
                prune_recovery.refit(pruned.graph, node, found[layer_key(node)], config.ridge, taken)
        recovery.update(found)
    return StructuredStatistics(energy, recovery)


class PruneStructuredPass(ir.passes.InPlacePass):
    """Remove whole output channels of Conv, neurons of MatMul/Gemm and attention heads.

    Channels are followed from each producer to the layers that read them, and every
    tensor in between is rewritten: the consumers' input channels, biases, BatchNorm
    statistics, Reshape targets (head counts) and the recorded shapes. Channels tied by a
    residual Add are pruned in all their producers at once (or skipped, ``residual=skip``).
    A group that reaches a graph output, a LayerNorm over the channels or an op without a
    rule is left whole, with the reason in a debug log and in ``details``. With
    ``recover`` the consumers are re-fitted by least squares on calibration data. The
    channel counts before pruning are stored in the model's metadata, so a second run with
    the same ratio changes nothing. Graph inputs and outputs keep their names, shapes and
    types; only the main graph is pruned (subgraphs and functions are left alone). Run
    ``fold`` after it to fold BatchNorm into the narrower convolutions.

    Attributes:
        config: The pass options.
        statistics: Calibration results (empty for weight importance without recovery).
    """

    def __init__(self, config: PruneStructuredConfig, statistics: StructuredStatistics | None = None) -> None:
        super().__init__()
        self.config = config
        self.statistics = statistics or StructuredStatistics()
        self.details: dict[str, object] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = find_groups(model, self.config)
        chosen = plan(model, groups, self.config, self.statistics.energy)
        missing = []
        if chosen and self.config.importance == "activation" and not self.statistics.energy:
            missing.append("importance=activation")
        if chosen and self.config.recover and not self.statistics.recovery:
            missing.append("recover")
        if missing:
            raise PassError(
                f"prune_structured: {' and '.join(missing)} need calibration statistics; run the pass through a "
                "pipeline with calibration data, or use importance=weight and recover=false."
            )
        params_before = _parameters(model)
        taken: set[str] = set()
        apply_plan(model, chosen, taken)
        refitted = self._recover(model, chosen, taken)
        self.details = _summary(groups, chosen, refitted, params_before, _parameters(model))
        return ir.passes.PassResult(model, modified=bool(chosen))

    def _recover(self, model: ir.Model, chosen: list[tuple[ChannelGroup, np.ndarray]], taken: set[str]) -> set[str]:
        if not self.config.recover:
            return set()
        refitted = set()
        for group, _ in chosen:
            for node, _member in group.consumers:
                key = layer_key(node)
                stats = self.statistics.recovery.get(key)
                if stats is None or key in refitted:
                    continue
                if prune_recovery.refit(model.graph, node, stats, self.config.ridge, taken):
                    refitted.add(key)
        return refitted


def _parameters(model: ir.Model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value is not None)


def _summary(
    groups: list[ChannelGroup],
    chosen: list[tuple[ChannelGroup, np.ndarray]],
    refitted: set[str],
    params_before: int,
    params_after: int,
) -> dict[str, object]:
    """What was removed where, and why the other groups were left whole."""
    pruned = {
        group.name: {
            "kind": group.kind,
            "channels_before": group.channels,
            "channels_after": len(kept),
            "unit": group.granularity,
            "producers": [n.name for n, _ in group.producers],
            "consumers": [n.name for n, _ in group.consumers],
            "refitted": sorted(layer_key(n) for n, _ in group.consumers if layer_key(n) in refitted),
        }
        for group, kept in chosen
    }
    left = {g.name: g.failure for g in groups if g.failure}
    return {
        "groups_pruned": len(chosen),
        "channels_removed": sum(g.channels - len(k) for g, k in chosen),
        "channels_total": sum(g.channels for g, _ in chosen),
        "parameters_before": params_before,
        "parameters_after": params_after,
        "groups": pruned,
        "left_whole": left,
    }
