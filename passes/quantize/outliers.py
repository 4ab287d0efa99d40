"""Outlier channels: the few input channels that would set a MatMul's int8 scale run in float.

Transformers have a handful of activation channels several times larger than the rest (as
all-MiniLM-L6-v2's FFN GELU outputs). A per-tensor int8 scale must cover them, so every other
channel loses bits. As in
LLM.int8(), ``y = x @ W`` is split by input channel::

    y = Q(x) @ W_inliers  +  x[..., outliers] @ W[outliers, :]

``W_inliers`` is ``W`` with the outlier rows zeroed, so the int8 product ignores whatever
the clipped outlier channels hold, and the clipping range of ``x`` is that of the other
channels. The float product reads only the outlier channels (a Gather of a few columns and a
``[k, N]`` MatMul with k at most 1/64 of the channels): a small share of the MatMul's work.

Calibration records per-channel bounds of MatMul inputs (:class:`ChannelBounds`); the pass
plans (:func:`plan`) before it computes scales and adds the float branches
(:func:`add_float_branches`) after its Q/DQ pairs are in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.passes import edit

Range = tuple[float, float]
MAX_FRACTION = 1 / 64  # at most this share of a MatMul's input channels (and at least one) go float


class ChannelBounds:
    """Streaming per-channel (last axis) min and max of some tensors; non-finite values ignored."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names)
        self.bounds: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._squares: dict[str, tuple[np.ndarray, int]] = {}

    def __call__(self, name: str, array: np.ndarray) -> None:
        if name not in self.names or array.ndim < 1 or array.size == 0:
            return
        flat = array.reshape(-1, array.shape[-1])
        finite = np.isfinite(flat)
        lo = np.where(finite, flat, np.inf).min(axis=0)
        hi = np.where(finite, flat, -np.inf).max(axis=0)
        squares = np.square(np.where(finite, flat, 0.0), dtype=np.float64).sum(axis=0)
        if name in self.bounds:
            old_lo, old_hi = self.bounds[name]
            if old_lo.shape != lo.shape:  # the channel axis changed size: not a channel axis
                self.names.discard(name)
                del self.bounds[name], self._squares[name]
                return
            lo, hi = np.minimum(old_lo, lo), np.maximum(old_hi, hi)
            squares = squares + self._squares[name][0]
        self.bounds[name] = (lo, hi)
        self._squares[name] = (squares, self._squares.get(name, (None, 0))[1] + len(flat))

    def power(self) -> dict[str, np.ndarray]:
        """Per channel mean of ``x**2`` (non-finite values counted as 0)."""
        return {name: (total / max(count, 1)).astype(np.float32) for name, (total, count) in self._squares.items()}


def eligible_matmul(node: ir.Node) -> bool:
    """``MatMul(x, W)`` with a constant 2-D float ``W`` and a float activation ``x``."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return False
    x, weight = node.inputs
    return (
        x is not None
        and x.const_value is None
        and x.dtype == ir.DataType.FLOAT
        and weight is not None
        and weight.const_value is not None
        and weight.dtype == ir.DataType.FLOAT
        and len(weight.const_value.shape) == 2
    )


def outlier_channels(lo: np.ndarray, hi: np.ndarray, threshold: float) -> np.ndarray:
    """Channels whose max |x| is over ``threshold`` x the reference channel's.

    The reference is the largest channel maximum outside the top ``MAX_FRACTION`` (at least
    one channel), so at most that many channels can be outliers and they cannot inflate the
    reference themselves.
    """
    absmax = np.maximum(-lo, hi)
    if threshold <= 0 or absmax.size < 8 or not np.isfinite(absmax).all():
        return np.zeros(0, np.int64)
    cap = max(1, int(absmax.size * MAX_FRACTION))
    reference = float(np.sort(absmax)[::-1][cap])
    if reference <= 0:
        return np.zeros(0, np.int64)
    return np.flatnonzero(absmax > threshold * reference).astype(np.int64)


@dataclass
class Split:
    """One MatMul whose outlier input channels run in float."""

    node: ir.Node
    activation: ir.Value
    channels: np.ndarray
    weight_name: str
    outlier_rows: np.ndarray  # W[channels, :]


def plan(
    nodes: Iterable[ir.Node],
    channels: Mapping[str, tuple[np.ndarray, np.ndarray]],
    ranges: MutableMapping[str, Range],
    threshold: float,
    splittable: Callable[[ir.Node], bool],
    add_initializer: Callable[[str, np.ndarray], ir.Value],
) -> list[Split]:
    """Choose the splits, narrow the activations' ranges and zero the outlier weight rows.

    A tensor is split only when every reader is a MatMul ``splittable`` accepts (its Q is
    shared, and clipping would corrupt any other reader).
    """
    splits = []
    inliers: dict[tuple[str, tuple[int, ...]], ir.Value] = {}  # a shared weight is split once
    by_input: dict[str, list[ir.Node]] = {}
    for node in nodes:
        if eligible_matmul(node) and splittable(node):
            by_input.setdefault(node.inputs[0].name, []).append(node)
    for name, readers in by_input.items():
        x = readers[0].inputs[0]
        if name not in channels or name not in ranges or len(x.uses()) != len(readers):
            continue
        lo, hi = channels[name]
        if lo.shape[0] != readers[0].inputs[1].const_value.shape[0]:
            continue
        chosen = outlier_channels(lo, hi, threshold)
        if chosen.size == 0:
            continue
        keep = np.ones(lo.shape[0], bool)
        keep[chosen] = False
        rmin, rmax = ranges[name]
        ranges[name] = (max(rmin, float(lo[keep].min())), min(rmax, float(hi[keep].max())))
        for node in readers:
            weight = node.inputs[1]
            array = weight.const_value.numpy()
            key = (weight.name, tuple(chosen.tolist()))
            if key not in inliers:
                zeroed = array.copy()
                zeroed[chosen] = 0.0
                inliers[key] = add_initializer(f"{weight.name}_inliers", zeroed)
            node.replace_input_with(1, inliers[key])
            edit.drop_if_unused(node.graph, weight)
            splits.append(Split(node, x, chosen, weight.name, array[chosen].copy()))
    return splits


def add_float_branches(graph: ir.Graph, splits: Iterable[Split], taken: set[str]) -> None:
    """Add ``x[..., channels] @ W[channels]`` to each split MatMul's result (after its bias Add)."""
    renamed: set[str] = set()
    for split in splits:
        x, node = split.activation, split.node
        base = x.name
        if base not in renamed:
            _rename_clipped(graph, x, taken)
            renamed.add(base)
        index = edit.add_initializer(graph, edit.unique_name(graph, f"{base}_outlier_channels", taken), split.channels)
        rows = edit.add_initializer(
            graph, edit.unique_name(graph, f"{split.weight_name}_outlier_rows", taken), split.outlier_rows
        )
        picked = ir.Value(name=edit.unique_name(graph, f"{base}_outliers", taken), type=x.type)
        partial = ir.Value(name=edit.unique_name(graph, f"{node.outputs[0].name}_outliers", taken), type=x.type)
        gather = ir.node("Gather", [x, index], {"axis": -1}, outputs=[picked], name=picked.name)
        product = ir.node("MatMul", [picked, rows], outputs=[partial], name=partial.name)
        target, anchor = _after_bias(node)
        if target is not node.outputs[0]:
            # The MatMul's own output now holds the inlier channels' share only.
            node.outputs[0].name = edit.unique_name(graph, f"{node.outputs[0].name}_inliers", taken)
        # The complete sum takes over the original name (graph outputs, layer-wise matching).
        name = target.name
        target.name = edit.unique_name(graph, f"{name}_inliers", taken)
        total = ir.Value(name=name, shape=target.shape, type=target.type)
        target.replace_all_uses_with(total, replace_graph_outputs=True)
        add = ir.node("Add", [target, partial], outputs=[total], name=edit.unique_name(graph, f"{name}_total", taken))
        graph.insert_after(anchor, [gather, product, add])


def _rename_clipped(graph: ir.Graph, x: ir.Value, taken: set[str]) -> None:
    """Rename ``x``'s DQ output, clipped on the outlier channels on purpose.

    Layer-wise comparison matches ``<x>_DequantizeLinear`` with the reference ``x``; the
    clipped channels would read as a large error that the float branch in fact undoes.
    """
    for use in x.uses():
        if use.node.op_type != "QuantizeLinear":
            continue
        for reader in use.node.outputs[0].uses():
            if reader.node.op_type == "DequantizeLinear":
                out = reader.node.outputs[0]
                out.name = edit.unique_name(graph, f"{x.name}_inliers_DequantizeLinear", taken)


def _after_bias(node: ir.Node) -> tuple[ir.Value, ir.Node]:
    """The MatMul's output, or that of the constant-bias Add reading only it (kept fusable)."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and not out.is_graph_output():
        reader = uses[0].node
        other = [v for v in reader.inputs if v is not out]
        if reader.op_type == "Add" and len(other) == 1 and other[0] is not None and other[0].const_value is not None:
            return reader.outputs[0], reader
    return out, node
