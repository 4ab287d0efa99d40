"""Weight pruning: unstructured or N:M (2:4) zeros in MatMul/Gemm/Conv weights."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.calibration.sources import require_data
from graphopt.errors import PassError
from graphopt.passes import edit
from graphopt.passes.edit import trans_b
from graphopt.passes.prune import scoring
from graphopt.passes.prune.calibration import LayerStatistics, collect_layer_statistics, layer_key
from graphopt.passes.prune.config import PruneConfig
from graphopt.serialize import SPARSE_INDEX_BYTES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layer:
    """A node whose constant weight can be pruned, with its weight seen as ``[out, reduction]``."""

    node: ir.Node
    weight: ir.Value
    trans_b: bool

    @property
    def key(self) -> str:
        return layer_key(self.node)

    def rows(self) -> np.ndarray:
        return scoring.weight_rows(self.node.op_type, self.weight.const_value.numpy(), trans_b=self.trans_b)  # type: ignore[union-attr]

    def store(self, rows: np.ndarray) -> None:
        shape = tuple(self.weight.const_value.shape)  # type: ignore[union-attr]
        array = scoring.weight_from_rows(self.node.op_type, rows, shape, trans_b=self.trans_b)
        self.weight.const_value = ir.tensor(array, name=self.weight.name)


def prunable_layers(graph: ir.Graph, config: PruneConfig) -> list[Layer]:
    """MatMul/Gemm/Conv nodes (If/Loop/Scan bodies included) with a float constant weight the config selects."""
    layers = []
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in config.op_types:
            continue
        reason = _unprunable(graph, node, config)
        if reason:
            logger.debug("prune: %s %r left dense: %s", node.op_type, node.name, reason)
            continue
        layers.append(Layer(node, node.inputs[1], trans_b(node)))  # type: ignore[arg-type]
    return layers


def _unprunable(graph: ir.Graph, node: ir.Node, config: PruneConfig) -> str | None:
    """Why ``node``'s weight is left dense, or None when it can be pruned."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if edit.excluded(node, config.exclude, config.exclude_op_types):
        return "excluded by the config"
    if weight is None or weight.const_value is None or not weight.dtype.is_floating_point():
        return "its weight is not a float constant"
    if not weight.is_initializer() or weight.is_graph_input():
        return "its weight is not an initializer (or is a graph input)"
    if config.needs_data and node.graph is not graph:
        return f"inside an If/Loop/Scan body, where {config.method} has no calibration statistics"
    if len(weight.uses()) != 1:
        return f"its weight is shared by {len(weight.uses())} readers"
    rank = len(weight.const_value.shape)
    if (node.op_type != "Conv" and rank != 2) or (node.op_type == "Conv" and rank < 3):
        return f"weight of rank {rank} is not supported"
    if config.needs_data and node.op_type == "Conv" and node.attributes.get_int("group", 1) != 1:
        return f"grouped Conv has no {config.method} statistics"
    if config.pattern == "n:m":
        shape = tuple(weight.const_value.shape)
        if not scoring.nm_groups_fit(node.op_type, shape, config.m, trans_b=trans_b(node)):
            return f"reduction axis of weight {list(shape)} does not split into groups of {config.m}"
    return None


def collect_prune_statistics(model: ir.Model, data: object, config: PruneConfig) -> dict[str, LayerStatistics]:
    """Calibrate Wanda input norms or SparseGPT Hessians (the registry runs this before the pass)."""
    if not config.needs_data:
        return {}
    layers = prunable_layers(model.graph, config)
    if not layers:
        return {}
    spec = require_data(data, "prune")  # type: ignore[arg-type]
    return collect_layer_statistics(model, spec, [layer.node for layer in layers], gram=config.method == "sparsegpt")


class PruneWeightsPass(ir.passes.InPlacePass):
    """Set MatMul/Gemm/Conv weights to zero, unstructured or in an N:M (2:4) pattern.

    Unstructured pruning zeroes a fraction of each weight (``scope=layer``) or of all
    weights under one magnitude threshold (``scope=global``). N:M keeps ``n`` of every ``m``
    consecutive weights along the reduction axis: K of MatMul ``B[K, N]`` and of Gemm (by
    ``transB``), and the input channels at each kernel position of a Conv. Scores are
    magnitude, Wanda (|W| times the input's L2 norm) or SparseGPT, which also updates the
    kept weights to reconstruct each layer's output on the calibration data. Weights that
    already meet the target are left as they are, so a second run changes nothing. Graph
    inputs and outputs are untouched; weights read inside If/Loop/Scan bodies are pruned
    too (by magnitude: calibration cannot see into bodies); functions are left alone.
    Exact zeros survive symmetric weight quantization.

    Attributes:
        config: The pass options.
        statistics: Calibration statistics per layer (empty for magnitude).
    """

    def __init__(self, config: PruneConfig, statistics: Mapping[str, LayerStatistics] | None = None) -> None:
        super().__init__()
        self.config = config
        self.statistics = dict(statistics or {})
        self.details: dict[str, object] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        layers = prunable_layers(model.graph, self.config)
        missing = [layer.key for layer in layers if self.config.needs_data and layer.key not in self.statistics]
        if missing:
            raise PassError(
                f"prune: method={self.config.method} has no calibration statistics for {missing[:3]}; "
                "run it through a pipeline with calibration data, or use method=magnitude."
            )
        if self.config.scope == "global":
            pruned = self._global(layers)
        else:
            pruned = [layer for layer in layers if self._prune_layer(layer)]
        self._postcondition(pruned)
        self.details = _summary(layers, pruned, self.config)
        return ir.passes.PassResult(model, modified=bool(pruned))

    def _prune_layer(self, layer: Layer) -> bool:
        config, rows = self.config, layer.rows()
        if self._satisfied(rows):
            logger.debug("prune: %s already meets the target", layer.weight.name)
            return False
        stats = self.statistics.get(layer.key)
        if config.method == "sparsegpt":
            assert stats is not None and stats.gram is not None
            nm = (config.n, config.m) if config.pattern == "n:m" else (0, 0)
            rows = scoring.sparsegpt(
                rows,
                stats.gram,
                sparsity=config.sparsity,
                n=nm[0],
                m=nm[1],
                block_size=config.block_size,
                damp=config.damp,
            )
        else:
            scores = np.abs(rows.astype(np.float64))
            if config.method == "wanda":
                assert stats is not None
                scores *= np.sqrt(stats.sum_squares)[None, :]
            rows = rows * self._mask(scores)
        layer.store(rows)
        return True

    def _mask(self, scores: np.ndarray) -> np.ndarray:
        if self.config.pattern == "n:m":
            return scoring.nm_mask(scores, self.config.n, self.config.m)
        # Wanda compares weights within each output row (its comparison group).
        return scoring.unstructured_mask(scores, self.config.sparsity, per_row=self.config.method == "wanda")

    def _satisfied(self, rows: np.ndarray) -> bool:
        if self.config.pattern == "n:m":
            return scoring.nm_satisfied(rows, self.config.n, self.config.m)
        per_row = self.config.method == "wanda"
        return scoring.unstructured_satisfied(rows, self.config.sparsity, per_row=per_row)

    def _global(self, layers: list[Layer]) -> list[Layer]:
        """One magnitude threshold over all layers, so layers end up with different sparsity."""
        if not layers:
            return []
        magnitudes = np.concatenate([np.abs(layer.rows()).ravel() for layer in layers])
        count = int(np.floor(self.config.sparsity * magnitudes.size))
        if count == 0 or int(np.count_nonzero(magnitudes == 0)) >= count:
            return []
        threshold = np.partition(magnitudes, count - 1)[count - 1]
        pruned = []
        for layer in layers:
            rows = layer.rows()
            keep = np.abs(rows) > threshold
            if np.any(~keep & (rows != 0)):
                layer.store(rows * keep)
                pruned.append(layer)
        return pruned

    def _postcondition(self, pruned: list[Layer]) -> None:
        """Every pruned weight holds the pattern it was asked for (a failure is a graphopt bug)."""
        if self.config.pattern != "n:m":
            return
        for layer in pruned:
            if not scoring.nm_satisfied(layer.rows(), self.config.n, self.config.m):
                raise PassError(
                    f"prune: weight {layer.weight.name!r} of {layer.node.op_type} {layer.node.name!r} breaks the "
                    f"{self.config.n}:{self.config.m} pattern after pruning. This is a graphopt bug; please report it."
                )


def _summary(layers: list[Layer], pruned: list[Layer], config: PruneConfig) -> dict[str, object]:
    """Per-layer sparsity and bytes, so the report can attribute error to each weight."""
    per_layer = {}
    zeros = total = dense_bytes = coo_bytes = 0
    touched = {id(layer) for layer in pruned}
    for layer in layers:
        array = layer.weight.const_value.numpy()  # type: ignore[union-attr]
        nonzero = int(np.count_nonzero(array))
        layer_coo = nonzero * (array.itemsize + SPARSE_INDEX_BYTES)
        per_layer[layer.weight.name] = {
            "node": layer.node.name,
            "op": layer.node.op_type,
            "shape": list(array.shape),
            "sparsity": round(1.0 - nonzero / array.size, 4),
            "pruned_now": id(layer) in touched,
            "dense_bytes": int(array.nbytes),
            "coo_bytes": layer_coo,
        }
        zeros += array.size - nonzero
        total += array.size
        dense_bytes += int(array.nbytes)
        coo_bytes += layer_coo
    pattern = f"{config.n}:{config.m}" if config.pattern == "n:m" else f"unstructured {config.sparsity:g}"
    return {
        "pattern": pattern,
        "method": config.method,
        "layers_pruned": len(pruned),
        "layers_considered": len(layers),
        "sparsity": round(zeros / total, 4) if total else 0.0,
        "weight_bytes_dense": dense_bytes,
        "weight_bytes_coo_int64": coo_bytes,
        "layers": per_layer,
    }
