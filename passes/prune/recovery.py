"""Accuracy recovery after channel pruning: re-fit each consumer by least squares.

After channels are removed, the layer that read them (the consumer) sees fewer inputs.
Its weights are re-fitted so that, on calibration data, its output from the pruned
model's inputs ``X'`` matches the dense model's output ``Y``, as in channel pruning by
reconstruction (He et al., 2017; ThiNet). Both models run side by side on the same
batches and only ``X'^T X'`` and ``X'^T Y`` are kept, so memory does not grow with the
number of samples. The solve is ridge-regularised towards the current weights:
``(X'^T X' + l I) W = X'^T Y + l W0``, with a bias column when the layer has a bias.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graphopt import runtime
from graphopt.calibration.collect import with_outputs
from graphopt.calibration.sources import DataSpec, input_specs, iter_batches
from graphopt.errors import DataError
from graphopt.numerics.gram import GramAccumulator
from graphopt.passes.edit import add_initializer, trans_b, unique_name
from graphopt.passes.prune import scoring
from graphopt.passes.prune.calibration import layer_features, layer_key

logger = logging.getLogger(__name__)


@dataclass
class RecoveryStatistics:
    """Normal equations of one consumer's re-fit.

    Attributes:
        xtx: ``X'^T X'`` with a trailing ones column when ``bias`` is set.
        xty: ``X'^T Y`` for the outputs the pruned layer still has.
        rows: Rows (samples x positions) accumulated.
        bias: Whether the last row/column is the bias term.
    """

    xtx: np.ndarray
    xty: np.ndarray
    rows: int
    bias: bool


def bias_target(node: ir.Node) -> tuple[ir.Node, int] | None:
    """Where a re-fitted bias goes: (node, input index), or None when the layer has no bias slot.

    A Conv or Gemm (alpha = beta = 1) keeps it in input 2; a MatMul in the constant of the
    Add that alone reads its output.
    """
    if node.op_type == "Conv":
        return node, 2
    if node.op_type == "Gemm":
        plain = node.attributes.get_float("alpha", 1.0) == 1.0 and node.attributes.get_float("beta", 1.0) == 1.0
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        one_d = bias is None or (bias.const_value is not None and len(bias.const_value.shape) == 1)
        return (node, 2) if plain and one_d else None
    uses = list(node.outputs[0].uses())
    if node.outputs[0].is_graph_output() or len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add, index = uses[0].node, uses[0].idx
    bias = add.inputs[1 - index]
    width = node.outputs[0].shape[-1] if node.outputs[0].shape is not None else None
    if bias is None or bias.const_value is None or tuple(bias.const_value.shape) != (width,):
        return None
    return add, 1 - index


def _targets(node: ir.Node, y: np.ndarray) -> np.ndarray:
    """The dense layer's output as ``[rows, outputs]``."""
    if node.op_type == "Conv":
        return np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


class _Accumulator:
    def __init__(self, node: ir.Node, kept_outputs: np.ndarray | None) -> None:
        self.node, self.kept = node, kept_outputs
        self.bias = bias_target(node) is not None
        self.grams = GramAccumulator()

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        features = layer_features(self.node, x)
        if self.bias:
            features = np.hstack([features, np.ones((len(features), 1), features.dtype)])
        targets = _targets(self.node, y)
        self.grams.add(features, targets[:, self.kept] if self.kept is not None else targets)

    def result(self) -> RecoveryStatistics | None:
        self.grams.flush()
        if self.grams.xtx is None or self.grams.xty is None:
            return None
        return RecoveryStatistics(self.grams.xtx, self.grams.xty, self.grams.rows, self.bias)


def _session_for(model: ir.Model, names: Sequence[str]) -> object:
    """An ONNX Runtime session of ``model`` cut down to compute just the tensors ``names``."""
    clone = with_outputs(model, names)
    wanted = set(names)
    for value in [v for v in clone.graph.outputs if v.name not in wanted]:
        clone.graph.outputs.remove(value)
    common_passes.RemoveUnusedNodesPass()(clone)
    return runtime.create_session(clone)


def collect_recovery(
    dense: ir.Model,
    pruned: ir.Model,
    data: DataSpec,
    consumers: Sequence[ir.Node],
    kept_outputs: Mapping[str, np.ndarray],
) -> dict[str, RecoveryStatistics]:
    """Run both models on the same batches; accumulate the normal equations of each consumer.

    Args:
        dense: The model before pruning (targets ``Y``).
        pruned: The pruned model, not yet re-fitted (inputs ``X'``); ``consumers`` are its nodes.
        data: Calibration data.
        consumers: Layers to re-fit.
        kept_outputs: For a consumer whose own output channels were pruned too, the
            indices (along its output axis) it kept; keyed by its output name.
    """
    accumulators = {layer_key(n): _Accumulator(n, kept_outputs.get(layer_key(n))) for n in consumers}
    x_names = {key: acc.node.inputs[0].name or "" for key, acc in accumulators.items()}
    specs = input_specs(dense)
    fetch = [n for n in dict.fromkeys(x_names.values()) if n not in {s.name for s in specs}]
    dense_session = _session_for(dense, list(accumulators))
    pruned_session = _session_for(pruned, fetch) if fetch else None
    seen = 0
    for batch in iter_batches(data, specs):
        seen += 1
        ys = runtime.run(dense_session, batch, list(accumulators))  # type: ignore[arg-type]
        xs = {**batch, **(runtime.run(pruned_session, batch, fetch) if pruned_session else {})}  # type: ignore[arg-type]
        for key, accumulator in accumulators.items():
            accumulator.add(np.asarray(xs[x_names[key]], np.float32), ys[key])
    if not seen:
        raise DataError(
            "prune_structured: the calibration data gave no batches for the re-fit; give calibration samples "
            "(--calib DATA)."
        )
    results = {key: acc.result() for key, acc in accumulators.items()}
    return {key: stats for key, stats in results.items() if stats is not None}


def stages(graph: ir.Graph, consumers: Sequence[ir.Node]) -> list[list[ir.Node]]:
    """Consumers in the order they can be re-fitted: none depends on another of its stage.

    A consumer's stage is the number of consumers upstream of it, so each stage is fitted
    on inputs that already come from re-fitted layers.
    """
    wanted = {id(n) for n in consumers}
    depth: dict[ir.Value, int] = {}
    by_stage: dict[int, list[ir.Node]] = {}
    for node in graph:  # topological order
        level = max((depth.get(v, 0) for v in node.inputs if v is not None), default=0)
        if id(node) in wanted:
            by_stage.setdefault(level, []).append(node)
            level += 1
        for out in node.outputs:
            depth[out] = level
    return [by_stage[level] for level in sorted(by_stage)]


def refit(graph: ir.Graph, node: ir.Node, stats: RecoveryStatistics, ridge: float, taken: set[str]) -> bool:
    """Replace ``node``'s weight (and bias) with the ridge least-squares solution; False if it no longer fits."""
    weight = node.inputs[1]
    current = scoring.weight_rows(node.op_type, weight.const_value.numpy(), trans_b=trans_b(node))  # type: ignore[union-attr]
    columns = current.shape[1] + int(stats.bias)
    if stats.xtx.shape[0] != columns or stats.xty.shape[1] != current.shape[0]:
        logger.warning("prune_structured: statistics of %s do not fit its weight; not re-fitted", node.name)
        return False
    lhs = stats.xtx.copy()
    rhs = stats.xty.copy()
    width = current.shape[1]
    damping = ridge * float(np.mean(np.diag(lhs)[:width])) + 1e-12
    lhs[np.arange(width), np.arange(width)] += damping
    rhs[:width] += damping * current.T
    try:
        solution = np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:  # singular even with damping (ridge=0 and dead inputs)
        solution = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    rows = solution[:width].T.astype(current.dtype)
    shape = tuple(weight.const_value.shape)  # type: ignore[union-attr]
    array = scoring.weight_from_rows(node.op_type, rows, shape, trans_b=trans_b(node))
    weight.const_value = ir.tensor(array, name=weight.name)  # type: ignore[union-attr]
    if stats.bias:
        _store_bias(graph, node, solution[width].astype(current.dtype), taken)
    return True


def _store_bias(graph: ir.Graph, node: ir.Node, bias: np.ndarray, taken: set[str]) -> None:
    """Write the fitted bias: replace a Conv/Gemm bias, add to a MatMul's following Add."""
    target = bias_target(node)
    if target is None:
        return
    owner, index = target
    old = owner.inputs[index] if len(owner.inputs) > index else None
    if owner is not node and old is not None and old.const_value is not None:
        bias = old.const_value.numpy() + bias  # MatMul: Y held no bias, so this is a correction
    if old is not None and old.name in graph.initializers and len(old.uses()) == 1:
        old.const_value = ir.tensor(bias, name=old.name)
        return
    base = f"{node.inputs[1].name}_bias" if old is None else f"{old.name}_refit"  # type: ignore[union-attr]
    value = add_initializer(graph, unique_name(graph, base, taken), bias)
    if len(owner.inputs) <= index:
        owner.resize_inputs(index + 1)
    owner.replace_input_with(index, value)
