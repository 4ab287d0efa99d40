"""SmoothQuant: a MatMul input's outlier channels scaled down, the weight's rows scaled up by as much.

A transformer's LayerNorm outputs carry a few channels far larger than the rest; one uint8 scale
per tensor must cover them and every other channel loses bits (on all-MiniLM-L6-v2 as it ships in
int8, these tensors alone at 16 bits took the embedding cosine from 0.9895 to 0.9956).
``y = x @ W = (x / s) @ (diag(s) W)`` for any positive per-channel ``s`` (Xiao et al., 2023):
``s_j = max|x_j|^a / max|W_j|^(1-a)`` moves the difficulty from the activation to the weight,
whose scales are per output channel anyway.

The exponent ``a`` is chosen per tensor, without running the model again, by the error it predicts:
uniform rounding noise of the activation's step over ``||W'||^2`` plus each weight column's step
over ``E[x'^2]``, from the per-channel bounds and mean squares calibration recorded. A tensor is
smoothed only if that error falls by a fifth, and only with per-channel weight scales. Its int8
range is then the min/max of its scaled per-channel bounds (the outliers ``percentile`` would clip
are gone). Where every reader of ``x`` is a smoothed MatMul and ``x`` comes from a
LayerNormalization, ``1/s`` goes into its scale and bias (no new op, the output renamed);
otherwise a ``Mul(x, 1/s)`` feeds the smoothed readers and the others read ``x`` as before.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.passes import edit
from graphopt.passes.quantize.select import drop_dequantization, is_weight, weight_array

logger = logging.getLogger(__name__)

ALPHAS = (0.25, 0.4, 0.5, 0.6, 0.75)
GAIN = 0.8  # smoothed only where the predicted error is at most this share of the unsmoothed one
_S_BOUNDS = (1e-4, 1e4)


@dataclass
class Smoothing:
    """Tensors smoothed together (they share weights, so they share scales), their readers and the estimate."""

    names: list[str]
    readers: list[ir.Node]
    scales: np.ndarray
    alpha: float
    error_ratio: float


def _reader_ok(node: ir.Node, x: ir.Value) -> bool:
    """A MatMul/Gemm reading ``x`` as its activation, with a 2-D weight whose rows are ``x``'s channels."""
    if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[0] is not x:
        return False
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return False
    weight = node.inputs[1]
    return weight is not None and weight is not x and weight.dtype == ir.DataType.FLOAT and is_weight(weight)


def _rows(node: ir.Node, array: np.ndarray) -> np.ndarray:
    """The weight as ``[K, N]`` (rows = input channels)."""
    return array.T if edit.trans_b(node) else array


def _predicted_error(
    lo: np.ndarray, hi: np.ndarray, power: np.ndarray, weights: Sequence[np.ndarray], s: np.ndarray, qmax: int
) -> float:
    """Rounding noise of ``Q(x / s) @ Q(diag(s) W)`` summed over readers (uniform noise, variance step²/12)."""
    x_lo, x_hi = min(0.0, float((lo / s).min())), max(0.0, float((hi / s).max()))
    x_step = (x_hi - x_lo) / 255.0
    x_power = float((power / s**2).sum())
    total = 0.0
    for w in weights:
        scaled = w * s[:, None]
        w_step = np.abs(scaled).max(axis=0) / qmax
        total += x_step**2 / 12.0 * float(np.square(scaled).sum()) + float((w_step**2).sum()) / 12.0 * x_power
    return total


def _components(by_input: dict[str, list[ir.Node]]) -> list[tuple[list[str], list[ir.Node]]]:
    """Inputs joined by the weights their readers share (an unrolled decoder reads one weight at every step):
    each group needs one scale vector, or the shared weight a copy per scaling."""
    weight_inputs: dict[str, set[str]] = {}
    for name, readers in by_input.items():
        for node in readers:
            weight_inputs.setdefault(node.inputs[1].name, set()).add(name)  # type: ignore[union-attr]
    parent = {name: name for name in by_input}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for names in weight_inputs.values():
        first, *rest = sorted(names)
        for other in rest:
            parent[root(other)] = root(first)
    groups: dict[str, list[str]] = {}
    for name in by_input:
        groups.setdefault(root(name), []).append(name)
    return [(names, [n for name in names for n in by_input[name]]) for names in groups.values()]


def plan(
    nodes: Sequence[ir.Node],
    channels: MutableMapping[str, tuple[np.ndarray, np.ndarray]],
    power: MutableMapping[str, np.ndarray],
    qmax: int,
    skip: set[str],
) -> list[Smoothing]:
    """Choose the tensors to smooth among the inputs of the selected MatMul/Gemm nodes, and their scales."""
    by_input: dict[str, list[ir.Node]] = {}
    for node in nodes:
        x = node.inputs[0] if node.inputs else None
        if x is not None and x.name and x.name not in skip and _reader_ok(node, x):
            by_input.setdefault(x.name, []).append(node)
    out = []
    for names, readers in _components(by_input):
        if not all(name in channels and name in power for name in names):
            continue
        # every reader of each weight is smoothed with it (else the weight would need a copy), in one orientation
        orientation: dict[str, bool] = {}
        if any(orientation.setdefault(r.inputs[1].name, edit.trans_b(r)) != edit.trans_b(r) for r in readers):
            continue
        mine = {id(r) for r in readers}
        if any(use.node is not None and id(use.node) not in mine for r in readers for use in r.inputs[1].uses()):
            continue
        first = {r.inputs[1].name: r for r in readers}  # each weight evaluated once (a Cast·Mul one is computed)
        weights = [_rows(r, weight_array(r.inputs[1])) for r in first.values()]  # type: ignore[arg-type]
        k = channels[names[0]][0].shape
        if any(channels[n][0].shape != k for n in names) or any(w.ndim != 2 or w.shape[:1] != k for w in weights):
            continue
        lo = np.min([channels[n][0] for n in names], axis=0)
        hi = np.max([channels[n][1] for n in names], axis=0)
        mean_square = np.mean([power[n] for n in names], axis=0)
        amax_x = np.maximum(np.abs(lo), np.abs(hi)).astype(np.float64)
        amax_w = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
        live = (amax_x > 0) & (amax_w > 0)
        if not live.any():
            continue
        base = _predicted_error(lo, hi, mean_square, weights, np.ones_like(amax_x), qmax)
        best: tuple[float, float, np.ndarray] | None = None
        for alpha in ALPHAS:
            s = np.ones_like(amax_x)
            s[live] = np.clip(amax_x[live] ** alpha / amax_w[live] ** (1.0 - alpha), *_S_BOUNDS)
            s = s / np.exp(np.mean(np.log(s)))  # overall level: the weights' and activation's scales absorb it
            error = _predicted_error(lo, hi, mean_square, weights, s, qmax)
            if best is None or error < best[0]:
                best = (error, alpha, s)
        if best is None or base <= 0 or best[0] > GAIN * base:
            continue
        error, alpha, s = best
        out.append(Smoothing(names, readers, s.astype(np.float32), alpha, error / base))
    return out


def _fold_into_layer_norm(graph: ir.Graph, x: ir.Value, inverse: np.ndarray, taken: set[str]) -> bool:
    """Divide a LayerNormalization's constant scale and bias by ``s`` (exact, no new op), when ``x`` is its
    only output in use and its parameters are read by nothing else."""
    node = x.producer()
    if node is None or node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx"):
        return False
    if node.outputs[0] is not x or any(o.uses() for o in node.outputs[1:]) or x.is_graph_output():
        return False
    axis = node.attributes.get_int("axis", -1)
    params = [v for v in node.inputs[1:3] if v is not None]
    if axis not in (-1, (len(x.shape) - 1) if x.shape is not None else -2):
        return False
    for value in params:
        array = value.const_value.numpy() if value.const_value is not None else None
        if array is None or array.shape[-1:] != inverse.shape or len(value.uses()) != 1:
            return False
    for index, value in enumerate(node.inputs[1:3], start=1):
        if value is None:
            continue
        scaled = (value.const_value.numpy() * inverse).astype(np.float32)  # type: ignore[union-attr]
        new = edit.add_initializer(graph, edit.unique_name(graph, f"{value.name}_smoothed", taken), scaled)
        node.replace_input_with(index, new)
        edit.drop_if_unused(graph, value)
    return True


def apply(
    graph: ir.Graph,
    smoothing: Smoothing,
    values: dict[str, ir.Value],
    taken: set[str],
) -> tuple[dict[str, ir.Value], dict[str, str]]:
    """Rewrite the graph for one group of smoothed tensors; returns ``{old input name: the value its smoothed
    readers now read}`` and ``{new weight name: old weight name}``."""
    s, inverse = smoothing.scales, (1.0 / smoothing.scales).astype(np.float32)
    readers = {id(n) for n in smoothing.readers}
    targets: dict[str, ir.Value] = {}
    factor: ir.Value | None = None
    for name in smoothing.names:
        x = values[name]
        if all(id(use.node) in readers for use in x.uses()) and _fold_into_layer_norm(graph, x, inverse, taken):
            # new values, new name: layer-wise comparison must not match them with the reference's x
            x.name = edit.unique_name(graph, f"{name}_smoothed", taken)
            targets[name] = x
            continue
        if factor is None:
            factor = edit.add_initializer(graph, edit.unique_name(graph, f"{name}_smooth_scale", taken), inverse)
        target = ir.Value(name=edit.unique_name(graph, f"{name}_smoothed", taken), shape=x.shape, type=x.type)
        mul = ir.node("Mul", [x, factor], outputs=[target], name=target.name)
        producer = x.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, mul)
        else:
            graph.insert_before(next(iter(graph)), mul)
        for node in smoothing.readers:
            if node.inputs[0] is x:
                node.replace_input_with(0, target)
        targets[name] = target
    renamed: dict[str, str] = {}
    done: dict[str, ir.Value] = {}
    for node in smoothing.readers:
        weight = node.inputs[1]
        assert weight is not None
        if weight.name not in done:
            array = weight_array(weight)
            assert array is not None
            scaled = array * (s[None, :] if edit.trans_b(node) else s[:, None])
            done[weight.name] = edit.add_initializer(  # type: ignore[index]
                graph, edit.unique_name(graph, f"{weight.name}_smoothed", taken), scaled.astype(np.float32)
            )
            renamed[done[weight.name].name] = weight.name  # type: ignore[index]
        node.replace_input_with(1, done[weight.name])  # type: ignore[index]
        edit.drop_if_unused(graph, weight)
        drop_dequantization(graph, weight)
    return targets, renamed


def rescale_hessian(hessian: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The Hessian blocks of ``x / s`` from those of ``x`` (blocks cut along ``s``'s rows, the last padded)."""
    count, size = hessian.shape[0], hessian.shape[1]
    padded = np.ones(count * size, np.float32)
    padded[: len(s)] = s
    inverse = (1.0 / padded).reshape(count, size)
    return hessian * inverse[:, :, None] * inverse[:, None, :]
