"""Calibration statistics for pruning: input feature norms (Wanda) and Gram matrices (SparseGPT).

A layer's input is turned into a feature matrix ``X [rows, reduction]`` whose columns are
ordered like the weight's reduction axis in :mod:`graphopt.passes.prune.scoring`, so that
``X @ rows.T`` is the layer's output: the last axis for MatMul, the input of Gemm, and
im2col patches ``(r, s, c)`` for Conv. Statistics are reduced batch by batch while the
data streams through ONNX Runtime, so memory is one batch plus ``K x K`` per layer.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.calibration.collect import stream_activations
from graphopt.calibration.sources import DataSpec
from graphopt.numerics.gram import GramAccumulator

logger = logging.getLogger(__name__)


@dataclass
class LayerStatistics:
    """What calibration measured on the input of one layer, keyed by the layer's output name.

    Attributes:
        sum_squares: Sum of x^2 per reduction column (Wanda's squared input norm).
        gram: ``X^T X`` over all rows (SparseGPT's Hessian up to a factor), or None.
        rows: How many rows (tokens, pixels) were seen.
    """

    sum_squares: np.ndarray
    gram: np.ndarray | None = None
    rows: int = 0


@dataclass
class _Accumulator:
    node: ir.Node
    gram: bool
    sum_squares: np.ndarray | None = None
    grams: GramAccumulator = field(default_factory=GramAccumulator)

    def add(self, x: np.ndarray) -> None:
        features = layer_features(self.node, x)
        squares = np.einsum("ij,ij->j", features, features, dtype=np.float64)
        self.sum_squares = squares if self.sum_squares is None else self.sum_squares + squares
        if self.gram:
            self.grams.add(features)
        else:
            self.grams.rows += len(features)

    def result(self) -> LayerStatistics | None:
        if self.sum_squares is None:
            return None
        self.grams.flush()
        return LayerStatistics(self.sum_squares, self.grams.xtx, self.grams.rows)


def layer_key(node: ir.Node) -> str:
    """The name statistics of ``node`` are stored under (its first output, unique in a graph)."""
    return node.outputs[0].name or ""


def collect_layer_statistics(
    model: ir.Model, data: DataSpec, nodes: Sequence[ir.Node], *, gram: bool
) -> dict[str, LayerStatistics]:
    """Stream ``data`` through ``model`` and reduce the input of every node in ``nodes``."""
    by_input: dict[str, list[_Accumulator]] = {}
    for node in nodes:
        source = node.inputs[0]
        if source is not None and source.name:
            by_input.setdefault(source.name, []).append(_Accumulator(node, gram))

    def consume(name: str, array: np.ndarray) -> None:
        for accumulator in by_input[name]:
            accumulator.add(np.asarray(array, dtype=np.float32))

    stream_activations(model, data, list(by_input), consume)
    result = {}
    for accumulators in by_input.values():
        for accumulator in accumulators:
            stats = accumulator.result()
            if stats is not None:
                result[layer_key(accumulator.node)] = stats
    logger.debug("prune calibration: statistics for %d layers", len(result))
    return result


def layer_features(node: ir.Node, x: np.ndarray) -> np.ndarray:
    """The ``[rows, reduction]`` feature matrix a MatMul/Gemm/Conv multiplies with its weight."""
    if node.op_type == "Conv":
        return conv_patches(node, x)
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return np.ascontiguousarray(x.T)
    return x.reshape(-1, x.shape[-1])


def conv_patches(node: ir.Node, x: np.ndarray) -> np.ndarray:
    """im2col of a Conv input: ``[N * out positions, kernel positions * C]``, channels fastest."""
    weight = node.inputs[1].const_value  # type: ignore[union-attr]
    kernel = tuple(int(d) for d in weight.shape[2:])  # type: ignore[union-attr]
    spatial = len(kernel)
    strides = _ints(node, "strides", (1,) * spatial)
    dilations = _ints(node, "dilations", (1,) * spatial)
    pads = _conv_pads(node, x.shape[2:], kernel, strides, dilations)
    padded = np.pad(x, [(0, 0), (0, 0), *zip(pads[:spatial], pads[spatial:], strict=True)])
    extents = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True))
    windows = np.lib.stride_tricks.sliding_window_view(padded, extents, axis=tuple(range(2, 2 + spatial)))
    # windows: [N, C, *out positions (stride 1), *extent]; keep every stride-th position and
    # every dilation-th tap.
    index = (
        slice(None),
        slice(None),
        *(slice(None, None, s) for s in strides),
        *(slice(None, None, d) for d in dilations),
    )
    windows = windows[index]
    order = (0, *range(2, 2 + spatial), *range(2 + spatial, 2 + 2 * spatial), 1)
    return np.ascontiguousarray(windows.transpose(order)).reshape(-1, math.prod(kernel) * x.shape[1])


def _ints(node: ir.Node, name: str, default: tuple[int, ...]) -> tuple[int, ...]:
    attr = node.attributes.get(name)
    return tuple(int(v) for v in attr.value) if attr is not None else default


def _conv_pads(
    node: ir.Node,
    size: tuple[int, ...],
    kernel: tuple[int, ...],
    strides: tuple[int, ...],
    dilations: tuple[int, ...],
) -> tuple[int, ...]:
    """Explicit (begins..., ends...) pads, resolving ``auto_pad`` as ONNX defines it."""
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    spatial = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for n, k, s, d in zip(size, kernel, strides, dilations, strict=True):
            total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        return (*begins, *ends)
    if auto_pad == "VALID":
        return (0,) * (2 * spatial)
    return _ints(node, "pads", (0,) * (2 * spatial))
