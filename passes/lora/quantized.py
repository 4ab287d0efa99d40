"""Merge LoRA into quantized base weights (QLoRA): dequantize, add the update, quantize again.

Three storage formats, each re-quantized in its own format, block size and scale type:

- ``DequantizeLinear(q, scale[, zero_point])`` feeding MatMul/Gemm/Conv: int8/uint8/int4/uint4,
  per tensor, per axis or blocked (opset 21 ``block_size``); symmetric stays symmetric;
- com.microsoft ``MatMulNBits`` (4 or 8 bits, blocks along K, optional uint8 zero points);
- com.microsoft ``MatMulBnb4`` (NF4/FP4 codes, one absmax per block).

The arithmetic is shared: :mod:`graphopt.numerics.blocks` (int blocks, MatMulNBits),
:mod:`graphopt.numerics.nf4` (NF4/FP4, MatMulBnb4) and :mod:`graphopt.numerics.affine` (per tensor/axis).
New scales are computed from the merged weight, so the update is never clipped; the
re-quantization error (merged float weight vs. what the new codes stand for) is returned
for the report. ``insert_float_branch`` is the alternative that keeps the quantized base
untouched and adds the LoRA beside it in float.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.numerics import affine
from graphopt.numerics import blocks as quant_blocks
from graphopt.numerics import nf4 as quant_nf4
from graphopt.passes import edit
from graphopt.passes.edit import single_reader
from graphopt.passes.lora.adapters import LoraFactors
from graphopt.passes.lora.targets import Target, WeightAccess, add_in_layout, attr, unique_name

logger = logging.getLogger(__name__)

_QTYPES = {
    ir.DataType.INT8: ("int8", 8),
    ir.DataType.UINT8: ("uint8", 8),
    ir.DataType.INT4: ("int4", 4),
    ir.DataType.UINT4: ("uint4", 4),
}
_SIGNED = frozenset({ir.DataType.INT8, ir.DataType.INT4})


def _sole_constants(node: ir.Node, values: list[ir.Value | None]) -> str | None:
    """Why ``values`` are not constant initializers read by ``node`` alone, or None."""
    for value in values:
        if value is None:
            continue
        if not value.is_initializer() or value.const_value is None or value.is_graph_input():
            return f"input {value.name} of {node.op_type} {node.name} is not a constant initializer"
        if single_reader(value) is not node:
            return f"quantized weight input {value.name} is also read by other nodes"
    return None


def _write(value: ir.Value, array: np.ndarray) -> None:
    dtype = value.const_value.dtype  # type: ignore[union-attr]
    array = np.ascontiguousarray(array).reshape(value.const_value.shape.numpy())  # type: ignore[union-attr]
    value.const_value = ir.tensor(array.astype(dtype.numpy()), dtype=dtype, name=value.name)


def _error(new: np.ndarray, wanted: np.ndarray) -> dict[str, float]:
    """How far the re-quantized weight is from the merged float weight."""
    diff = np.abs(new.astype(np.float64) - wanted.astype(np.float64))
    peak = float(np.abs(wanted).max()) or 1.0
    return {
        "max_abs_err": float(diff.max()),
        "rel_max_err": float(diff.max()) / peak,
        "rms_err": float(np.sqrt(np.mean(diff**2))),
    }


@dataclass
class DequantizeWeight:
    """A weight behind DequantizeLinear, re-quantized per tensor, per axis or in blocks."""

    target: Target
    dq: ir.Node

    def _format(self) -> tuple[int, int, bool]:
        q, scale = self.dq.inputs[0], self.dq.inputs[1]
        rank = len(q.shape or ())  # type: ignore[union-attr]
        axis = int(attr(self.dq, "axis", 1)) % max(rank, 1)  # type: ignore[call-overload]
        block = int(attr(self.dq, "block_size", 0))  # type: ignore[call-overload]
        per_tensor = scale is None or scale.const_value is None or scale.const_value.size == 1
        return axis, block, per_tensor

    def _symmetric(self) -> bool:
        q_type = self.dq.inputs[0].dtype  # type: ignore[union-attr]
        zp = self.dq.inputs[2].const_value.numpy() if len(self.dq.inputs) > 2 and self.dq.inputs[2] else None  # type: ignore[union-attr]
        if zp is None:
            return True
        middle = 0 if q_type in _SIGNED else 1 << (_QTYPES[q_type][1] - 1)  # type: ignore[index]
        return bool(np.all(zp.astype(np.int64) == middle))

    def dequantize(self) -> np.ndarray:
        """The float weight, computed as DequantizeLinear does: (q - zero_point) * scale."""
        q_value, scale_value = self.dq.inputs[0], self.dq.inputs[1]
        zp_value = self.dq.inputs[2] if len(self.dq.inputs) > 2 else None
        q = q_value.const_value.numpy().astype(np.int64)  # type: ignore[union-attr]
        scale = scale_value.const_value.numpy().astype(np.float32)  # type: ignore[union-attr]
        axis, block, per_tensor = self._format()
        if zp_value is not None:
            q = q - _expand(zp_value.const_value.numpy().astype(np.int64), q, axis, block, per_tensor)  # type: ignore[union-attr]
        return (q.astype(np.float32) * _expand(scale, q, axis, block, per_tensor)).astype(np.float32)

    def add(self, delta: np.ndarray, columns: tuple[int, int] | None) -> dict[str, float]:
        wanted = add_in_layout(self.dequantize().astype(np.float64), self.target, delta, columns)
        q_value, scale_value = self.dq.inputs[0], self.dq.inputs[1]
        zp_value = self.dq.inputs[2] if len(self.dq.inputs) > 2 else None
        qtype, bits = _QTYPES[q_value.dtype]  # type: ignore[index,union-attr]
        axis, block, per_tensor = self._format()
        symmetric = self._symmetric()
        if block:
            codes, scales, zps = _requantize_blocks(wanted, axis, block, bits, symmetric, scale_value.dtype)  # type: ignore[union-attr]
        else:
            params = affine.weight_params(wanted, qtype, axis=None if per_tensor else axis, symmetric=symmetric)
            codes, scales, zps = params.quantize(wanted), params.scale, params.zero_point
        _write(q_value, codes)  # type: ignore[arg-type]
        _write(scale_value, scales)  # type: ignore[arg-type]
        if zp_value is not None and zps is not None:
            _write(zp_value, zps)
        return _error(self.dequantize(), wanted)

    def changed(self) -> list[str]:
        return [self.dq.inputs[0].name or ""]  # type: ignore[union-attr]


def _expand(param: np.ndarray, q: np.ndarray, axis: int, block: int, per_tensor: bool) -> np.ndarray:
    """A scale or zero point broadcast to the codes' shape."""
    if per_tensor:
        return param.reshape(()) if param.size == 1 else param
    if not block:
        shape = [1] * q.ndim
        shape[axis] = -1
        return param.reshape(shape)
    return np.take(np.repeat(param, block, axis=axis), np.arange(q.shape[axis]), axis=axis)


def _requantize_blocks(
    w: np.ndarray, axis: int, block: int, bits: int, symmetric: bool, scale_type: ir.DataType
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Blocked codes, scales and zero points of ``w`` along ``axis``, shaped as DequantizeLinear reads them."""
    moved = np.moveaxis(w, axis, 0)
    flat = moved.reshape(moved.shape[0], -1)
    stype = "float16" if scale_type == ir.DataType.FLOAT16 else "float32"
    blocks = quant_blocks.quantize_int_blocks(flat, bits, block, symmetric=symmetric, scale_type=stype)

    def back(array: np.ndarray) -> np.ndarray:
        return np.moveaxis(array.reshape((array.shape[0], *moved.shape[1:])), 0, axis)

    zps = None if blocks.zero_points is None else back(blocks.zero_points)
    return back(blocks.codes), back(blocks.scales), zps


@dataclass
class NBitsWeight:
    """The B, scales and zero points of com.microsoft MatMulNBits, re-quantized with the same bits and block size."""

    target: Target

    def _inputs(self) -> tuple[ir.Value, ir.Value, ir.Value | None]:
        inputs = self.target.node.inputs
        return inputs[1], inputs[2], inputs[3] if len(inputs) > 3 else None  # type: ignore[return-value]

    def _layout(self) -> tuple[int, int, int, int]:
        node = self.target.node
        return tuple(int(attr(node, name, 0)) for name in ("K", "N", "bits", "block_size"))  # type: ignore[return-value,call-overload]

    def dequantize(self) -> np.ndarray:
        data, scales, zps = (v.const_value.numpy() if v is not None else None for v in self._inputs())  # type: ignore[union-attr]
        k, n, bits, block = self._layout()
        zps = None if zps is None else zps.reshape(n, -1)
        return quant_blocks.matmul_nbits_dequantize(data.reshape(n, -1, block * bits // 8), scales, zps, k, bits, block)  # type: ignore[union-attr]

    def add(self, delta: np.ndarray, columns: tuple[int, int] | None) -> dict[str, float]:
        _, n, bits, block = self._layout()
        wanted = self.dequantize().astype(np.float64)
        start, stop = columns or (0, n)
        wanted[:, start:stop] += delta
        data_value, scale_value, zp_value = self._inputs()
        stype = "float16" if scale_value.dtype == ir.DataType.FLOAT16 else "float32"
        blocks = quant_blocks.quantize_int_blocks(wanted, bits, block, symmetric=zp_value is None, scale_type=stype)
        data, scales, zps = quant_blocks.matmul_nbits_layout(blocks)
        _write(data_value, data)
        _write(scale_value, scales)
        if zp_value is not None and zps is not None:
            _write(zp_value, zps)
        return _error(self.dequantize(), wanted)

    def changed(self) -> list[str]:
        return [self._inputs()[0].name or ""]


@dataclass
class Bnb4Weight:
    """The packed NF4/FP4 codes and absmax of com.microsoft MatMulBnb4, re-quantized with the same block size."""

    target: Target

    def _layout(self) -> tuple[int, int, int, str]:
        node = self.target.node
        k, n, block = (int(attr(node, name, 0)) for name in ("K", "N", "block_size"))  # type: ignore[call-overload]
        return k, n, block, "nf4" if attr(node, "quant_type", 1) == 1 else "fp4"

    def dequantize(self) -> np.ndarray:
        k, n, block, kind = self._layout()
        data, absmax = (v.const_value.numpy() for v in self.target.node.inputs[1:3])  # type: ignore[union-attr]
        return quant_nf4.matmul_bnb4_dequantize(data.reshape(-1), absmax.reshape(-1), k, n, block, kind)  # type: ignore[arg-type]

    def add(self, delta: np.ndarray, columns: tuple[int, int] | None) -> dict[str, float]:
        _, n, block, kind = self._layout()
        wanted = self.dequantize().astype(np.float64)
        start, stop = columns or (0, n)
        wanted[:, start:stop] += delta
        blocks = quant_nf4.quantize_bnb4(wanted, kind, block, double_quant=False)  # type: ignore[arg-type]
        data, absmax = quant_nf4.matmul_bnb4_layout(blocks)
        _write(self.target.node.inputs[1], data)  # type: ignore[arg-type]
        _write(self.target.node.inputs[2], absmax)  # type: ignore[arg-type]
        return _error(self.dequantize(), wanted)

    def changed(self) -> list[str]:
        return [self.target.node.inputs[1].name or ""]  # type: ignore[union-attr]


def quantized_problem(target: Target) -> str | None:
    """Why ``target``'s quantized weight cannot be re-quantized in place, or None."""
    node = target.node
    if target.kind == "matmulnbits":
        bits, block = int(attr(node, "bits", 4)), int(attr(node, "block_size", 0))  # type: ignore[call-overload]
        if len(node.inputs) > 4 and node.inputs[4] is not None:
            return f"MatMulNBits {node.name} has a g_idx (act-order) input"
        zps = node.inputs[3] if len(node.inputs) > 3 else None
        if bits not in (4, 8) or block < 16 or (zps is not None and zps.dtype != ir.DataType.UINT8):
            return f"MatMulNBits {node.name}: bits={bits}, block_size={block}, zero points {zps and zps.dtype}"
        return _sole_constants(node, list(node.inputs[1:4]))
    if target.kind == "matmulbnb4":
        k, block = int(attr(node, "K", 0)), int(attr(node, "block_size", 0))  # type: ignore[call-overload]
        if block <= 0 or k % block:
            return f"MatMulBnb4 {node.name}: K={k} is not a multiple of block_size={block}"
        return _sole_constants(node, list(node.inputs[1:3]))
    dq = target.weight.producer()
    assert dq is not None
    if single_reader(target.weight) is not node:
        return f"the dequantized weight {target.weight.name} is also read by other nodes"
    q = dq.inputs[0]
    if q is None or q.dtype not in _QTYPES:
        return f"DequantizeLinear {dq.name} reads {q and q.dtype}, not int8/uint8/int4/uint4"
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    if zp is None and q.dtype not in _SIGNED:
        return f"DequantizeLinear {dq.name} reads unsigned codes without a zero point"
    if attr(dq, "block_size", 0) and (zp is not None) == (q.dtype in _SIGNED):
        return f"blocked DequantizeLinear {dq.name}: signed codes with zero points (or unsigned without)"
    return _sole_constants(dq, list(dq.inputs))


def quantized_weight(target: Target) -> WeightAccess | str:
    """Write access to a quantized target's weight (see :func:`quantized_problem`)."""
    problem = quantized_problem(target)
    if problem:
        return problem
    if target.kind == "matmulnbits":
        return NBitsWeight(target)
    if target.kind == "matmulbnb4":
        return Bnb4Weight(target)
    return DequantizeWeight(target, target.weight.producer())  # type: ignore[arg-type]


def insert_float_branch(target: Target, factors: LoraFactors) -> bool:
    """Add ``x·Aᵀ·Bᵀ`` (scale folded in) to the output of a quantized MatMul-like op; False for Conv."""
    graph, out = target.node.graph, target.output
    if graph is None or out is None or target.kind.startswith("conv"):
        return False
    dtype = target.dtype.numpy()
    base_name = target.node.name or out.name or "lora"
    readers = list(out.uses())
    values = []
    for suffix, array in (("lora_A", factors.a.T), ("lora_B", factors.b.T)):
        array = np.ascontiguousarray(array.astype(dtype))
        values.append(edit.add_initializer(graph, unique_name(graph, f"{base_name}.{suffix}"), array, target.dtype))
    down = ir.node("MatMul", [target.x, values[0]], name=unique_name(graph, f"{base_name}/lora_A"))
    up = ir.node("MatMul", [down.outputs[0], values[1]], name=unique_name(graph, f"{base_name}/lora_B"))
    total = ir.node("Add", [out, up.outputs[0]], name=unique_name(graph, f"{base_name}/lora_add"))
    graph.insert_after(target.node, [down, up, total])
    for node, index in readers:
        node.replace_input_with(index, total.outputs[0])
    total.outputs[0].type, total.outputs[0].shape = out.type, out.shape
    if out.is_graph_output():
        position = list(graph.outputs).index(out)
        name = out.name
        out.name = unique_name(graph, f"{name}_base")
        total.outputs[0].name = name
        graph.outputs[position] = total.outputs[0]
    logger.debug("merge_lora: kept %s quantized; added a float LoRA branch beside it", target.describe())
    return True
