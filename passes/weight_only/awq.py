"""AWQ: activation-aware scaling of weight rows before they are rounded (Lin et al., 2024).

A few input channels of a layer carry most of its activation energy; their weight rows matter most and lose
as much to 4-bit rounding as any other row. ``y = x @ W = (x / s) @ (diag(s) W)`` for any positive ``s``:
scaling those rows up before rounding gives them finer steps, relative to their size, at the cost of the
rest. AWQ takes ``s = mean(x^2)^(a/2)`` per input channel and searches the exponent ``a`` per layer input.

Here the search needs no extra model run: the calibration Hessian ``H = X^T X / n`` (which GPTQ reads
anyway) predicts each candidate's output error exactly, ``tr(D^T H D)`` for ``D = W - Q(diag(s) W) / s``,
summed over the layers that read the same input (Q, K and V; gate and up). Round-to-nearest without the
clip search stands in for the final rounding while ``a`` is searched.

``1/s`` has to go into what makes ``x``, so nothing runs at inference that did not before; an input is
scaled only when that fold is exact (up to the rounding of the scaled values) and every reader of ``x`` is a
scaled layer:

- a normalization's scale (and bias): LayerNormalization, SimplifiedLayerNormalization and ONNX Runtime's
  SkipLayerNormalization / SkipSimplifiedLayerNormalization (output 0 only; the residual sum is untouched);
- a product ``a * (v @ U)`` (a gated MLP's ``silu(gate) * up``): the columns of the constant ``U``.

The scaled tensors are renamed (the layer-wise comparison must not match them with the input's) and their
Hessians become ``diag(1/s) H diag(1/s)``, so GPTQ then rounds the scaled weights for the scaled inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.numerics.blocks import quantize_int_blocks
from graphopt.numerics.gptq import output_error
from graphopt.passes import edit
from graphopt.passes.weight_only.config import WeightOnlyConfig
from graphopt.passes.weight_only.layers import Layer

logger = logging.getLogger(__name__)

ALPHAS = tuple(round(a, 2) for a in np.linspace(0.0, 1.0, 11))
S_BOUNDS = (1e-2, 1e2)  # scales kept within this range: float16 weights and scales stay clear of under/overflow
# normalizations whose output 0 is ``normalized * scale (+ bias)``: index of the scale and of the bias (or None)
NORMS = {
    ("", "LayerNormalization"): (1, 2),
    ("", "SimplifiedLayerNormalization"): (1, None),
    ("com.microsoft", "SkipLayerNormalization"): (2, 3),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): (2, None),
}


@dataclass
class Scaling:
    """One layer input scaled: the readers, the scales, the exponent and where ``1/s`` went."""

    activation: str
    readers: list[Layer]
    scales: np.ndarray
    alpha: float
    error_ratio: float  # predicted output error with the scales over without
    fold: str  # "norm" or "matmul"

    def to_dict(self) -> dict[str, object]:
        return {
            "input": self.activation,
            "layers": [layer.node.name for layer in self.readers],
            "alpha": self.alpha,
            "error_ratio": round(self.error_ratio, 4),
            "fold": self.fold,
        }


def apply(
    graph: ir.Graph, layers: list[Layer], hessians: dict[str, np.ndarray], config: WeightOnlyConfig
) -> list[Scaling]:
    """Scale every layer input where it pays and folds exactly; ``hessians`` is updated (new names, new values).

    Only main-graph MatMuls with ``[K, N]`` weights that no other op reads take part (Hessians are collected
    there); tied weights and embedding tables are left alone.
    """
    groups: dict[str, list[Layer]] = {}
    for layer in layers:
        own = len(layer.weight.uses()) == 1 and not layer.weight.is_graph_output() and layer.node.graph is graph
        if layer.kind == "matmul" and not layer.transposed and layer.activation is not None and own:
            groups.setdefault(layer.activation.name, []).append(layer)
    taken: set[str] = set()  # filled by edit.unique_name on first use: every name of the graph and its bodies
    done = []
    for name, readers in groups.items():
        x = readers[0].activation
        hessian = hessians.get(name)
        if x is None or hessian is None or x.is_graph_output():
            continue
        if {id(use.node) for use in x.uses()} != {id(layer.node) for layer in readers}:
            continue  # another op reads x: it would see x / s
        fold = _fold_target(x, readers[0].k)
        if fold is None:
            continue
        found = _search(readers, hessian, config)
        if found is None:
            continue
        s, alpha, ratio = found
        _scale_weights(readers, s)
        kind = _fold(graph, fold, x, (1.0 / s).astype(np.float32), taken)
        x.name = edit.unique_name(graph, f"{name}_awq", taken)
        hessians[x.name] = (hessian / np.outer(s, s)).astype(np.float32)
        del hessians[name]
        done.append(Scaling(name, readers, s, alpha, ratio, kind))
    logger.debug("weight_only: AWQ scaled %d of %d layer inputs", len(done), len(groups))
    return done


def _search(
    readers: list[Layer], hessian: np.ndarray, config: WeightOnlyConfig
) -> tuple[np.ndarray, float, float] | None:
    """The exponent with the least predicted output error over the readers: (s, a, error over a=0's), or None
    when no exponent beats unscaled rounding."""
    energy = np.sqrt(np.maximum(np.diag(hessian).astype(np.float64), 0.0))
    live = energy > 0
    if not live.any():
        return None
    energy[~live] = energy[live].min()
    weights = [np.asarray(_matrix(layer), dtype=np.float32) for layer in readers]
    errors = {}
    for alpha in ALPHAS:
        s = energy**alpha
        s /= np.sqrt(s.max() * s.min())  # AWQ's normalization: the scales straddle 1
        s = np.clip(s, *S_BOUNDS).astype(np.float32)
        total = 0.0
        for layer, w in zip(readers, weights, strict=True):
            block = config.block_for(layer.k)
            scaled = w * s[:, None]
            # rounded as the pass will round it: float16 scales (for a float16 layer always) can underflow
            kind = "float16" if layer.dtype == ir.DataType.FLOAT16 else config.scale_type
            grid = quantize_int_blocks(scaled, config.bits, block, symmetric=config.symmetric, scale_type=kind)
            total += output_error(w, grid.dequantize() / s[:, None], hessian)
        errors[alpha] = (total, s)
    base = errors[0.0][0]
    alpha = min(errors, key=lambda a: errors[a][0])
    if alpha == 0.0 or base <= 0:
        return None
    return errors[alpha][1], alpha, errors[alpha][0] / base


def _matrix(layer: Layer) -> np.ndarray:
    return layer.weight.const_value.numpy()  # type: ignore[union-attr]


def _replace_constant(value: ir.Value, array: np.ndarray) -> None:
    """Give ``value`` new contents (same name, dtype and shape)."""
    value.const_value = ir.Tensor(array, name=value.name)


def _scale_weights(readers: list[Layer], s: np.ndarray) -> None:
    for layer in readers:
        w = _matrix(layer)
        _replace_constant(layer.weight, (w * s[:, None].astype(w.dtype)).astype(w.dtype))


def _fold_target(x: ir.Value, channels: int) -> tuple[str, ir.Node, int | None, int | None] | None:
    """Where ``1/s`` (``channels`` long) can go exactly: ("norm", node, scale index, bias index) or ("matmul",
    the product's constant MatMul, None, None)."""
    node = x.producer()
    if node is None:
        return None
    norm = NORMS.get(("" if node.domain == "ai.onnx" else node.domain, node.op_type))
    if norm is not None:
        if node.outputs[0] is not x or not _own_constant(node, norm[0], 1, channels):
            return None
        bias = norm[1] is not None and len(node.inputs) > norm[1] and node.inputs[norm[1]] is not None
        if bias and not _own_constant(node, norm[1], 1, channels):  # type: ignore[arg-type]
            return None
        if "Skip" not in node.op_type and node.attributes.get_int("axis", -1) != -1:  # normalized over the last axis
            return None
        return ("norm", node, norm[0], norm[1])
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or node.inputs[0] is node.inputs[1]:
        return None
    for value in node.inputs:
        matmul = value.producer() if value is not None else None
        if (
            matmul is not None
            and matmul.op_type == "MatMul"
            and matmul.domain in ("", "ai.onnx")
            and len(value.uses()) == 1  # type: ignore[union-attr]
            and not value.is_graph_output()  # type: ignore[union-attr]
            and _own_constant(matmul, 1, 2, channels)
        ):
            return ("matmul", matmul, None, None)
    return None


def _own_constant(node: ir.Node, index: int, rank: int, channels: int) -> bool:
    """Input ``index`` of ``node`` is a constant float tensor of ``rank`` dims, ``channels`` along the last, that
    only this node reads (a normalization's scale or bias: rank 1; a MatMul's B, whose columns can be scaled:
    rank 2)."""
    value = node.inputs[index] if len(node.inputs) > index else None
    return (
        value is not None
        and value.const_value is not None
        and len(value.const_value.shape) == rank
        and value.const_value.shape[-1] == channels
        and value.const_value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)
        and len(value.uses()) == 1
        and not value.is_graph_output()
    )


def _fold(
    graph: ir.Graph,
    target: tuple[str, ir.Node, int | None, int | None],
    x: ir.Value,
    inverse: np.ndarray,
    taken: set[str],
) -> str:
    """Put ``1/s`` into what makes ``x``; the tensors that change are renamed."""
    kind, node, scale, bias = target
    if kind == "norm":
        for index in (scale, bias):
            if index is None or len(node.inputs) <= index or node.inputs[index] is None:
                continue
            value = node.inputs[index]
            array = value.const_value.numpy()  # type: ignore[union-attr]
            _replace_constant(value, (array * inverse.astype(array.dtype)).astype(array.dtype))  # type: ignore[arg-type]
        return kind
    weight = node.inputs[1]
    array = weight.const_value.numpy()  # type: ignore[union-attr]
    _replace_constant(weight, (array * inverse[None, :].astype(array.dtype)).astype(array.dtype))  # type: ignore[arg-type]
    product = node.outputs[0]
    product.name = edit.unique_name(graph, f"{product.name}_awq", taken)
    return kind
