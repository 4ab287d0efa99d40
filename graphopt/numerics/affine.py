"""The quantization arithmetic shared by passes: ranges -> scales and zero points, and back.

Conventions (those of ONNX QuantizeLinear): ``q = saturate(round_half_even(x / scale) + zp)``
and ``x' = (q - zp) * scale``. Every range is widened to contain 0 so that 0 is exactly
representable (padding, ReLU outputs and pruned weights stay exactly zero). Symmetric
int8 uses [-127, 127] so the range is balanced around 0, as ONNX Runtime does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# name -> (numpy dtype, qmin, qmax)
QTYPES: dict[str, tuple[type[np.generic], int, int]] = {
    "int8": (np.int8, -128, 127),
    "uint8": (np.uint8, 0, 255),
    "int16": (np.int16, -32768, 32767),
    "uint16": (np.uint16, 0, 65535),
    "int4": (np.int8, -8, 7),
    "uint4": (np.uint8, 0, 15),
    "int32": (np.int32, -(2**31), 2**31 - 1),
}


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of a quantized tensor; arrays of one value per channel when ``axis`` is set."""

    scale: np.ndarray
    zero_point: np.ndarray
    qtype: str
    axis: int | None = None

    def _broadcast(self, array: np.ndarray, ndim: int) -> np.ndarray:
        if self.axis is None or array.ndim == 0:
            return array
        shape = [1] * ndim
        shape[self.axis] = -1
        return array.reshape(shape)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Quantize ``x`` as ONNX QuantizeLinear does (round half to even, saturate)."""
        dtype, qmin, qmax = QTYPES[self.qtype]
        scale = self._broadcast(self.scale.astype(np.float32), x.ndim)
        zp = self._broadcast(self.zero_point.astype(np.int64), x.ndim)
        q = np.rint(x.astype(np.float32) / scale).astype(np.int64) + zp
        return np.clip(q, qmin, qmax).astype(dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """Dequantize ``q`` as ONNX DequantizeLinear does."""
        scale = self._broadcast(self.scale.astype(np.float32), q.ndim)
        zp = self._broadcast(self.zero_point.astype(np.int64), q.ndim)
        return ((q.astype(np.int64) - zp) * scale).astype(np.float32)


def qrange(qtype: str, *, symmetric: bool, reduce_range: bool = False) -> tuple[int, int]:
    """The integer range used for ``qtype``.

    ``reduce_range`` keeps one bit free (7-bit weights) for CPUs whose int8 dot products
    can overflow (pre-VNNI x86, as ONNX Runtime's option of the same name).
    """
    if qtype not in QTYPES:
        raise ValueError(f"unknown quantized type {qtype!r}; choose one of {', '.join(QTYPES)}")
    _, qmin, qmax = QTYPES[qtype]
    if reduce_range:
        bits = int(np.log2(qmax - qmin + 1)) - 1
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if qmin < 0 else (0, 2**bits - 1)
    if symmetric and qmin < 0:
        qmin = -qmax  # balanced: -127..127 so +r and -r both map exactly
    return qmin, qmax


def compute_params(
    rmin: np.ndarray | float,
    rmax: np.ndarray | float,
    qtype: str,
    *,
    symmetric: bool,
    reduce_range: bool = False,
    axis: int | None = None,
) -> QuantParams:
    """Scale and zero point for the clipping range [rmin, rmax] (widened to include 0)."""
    qmin, qmax = qrange(qtype, symmetric=symmetric, reduce_range=reduce_range)
    rmin = np.minimum(np.asarray(rmin, dtype=np.float64), 0.0)
    rmax = np.maximum(np.asarray(rmax, dtype=np.float64), 0.0)
    if symmetric:
        absmax = np.maximum(-rmin, rmax)
        scale = 2.0 * absmax / (qmax - qmin)
        zero_point = np.full_like(scale, (qmax + qmin + 1) // 2 if qmin >= 0 else 0)
    else:
        scale = (rmax - rmin) / (qmax - qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zero_point = np.clip(np.rint(qmin - rmin / safe), qmin, qmax)
    # An all-zero tensor would get scale 0, which DequantizeLinear cannot undo: any
    # positive scale represents it exactly.
    scale = np.where(scale > np.finfo(np.float32).tiny, scale, 1.0).astype(np.float32)
    dtype = QTYPES[qtype][0]
    return QuantParams(scale, zero_point.astype(dtype), qtype, axis)


def weight_params(
    weight: np.ndarray, qtype: str, *, axis: int | None, symmetric: bool = True, reduce_range: bool = False
) -> QuantParams:
    """Params from a weight's own range, per tensor (``axis=None``) or per channel along ``axis``."""
    w = weight.astype(np.float32)
    if axis is None:
        return compute_params(
            w.min(initial=0.0), w.max(initial=0.0), qtype, symmetric=symmetric, reduce_range=reduce_range
        )
    axis = axis % w.ndim
    others = tuple(i for i in range(w.ndim) if i != axis)
    rmin, rmax = w.min(axis=others, initial=0.0), w.max(axis=others, initial=0.0)
    return compute_params(rmin, rmax, qtype, symmetric=symmetric, reduce_range=reduce_range, axis=axis)


def bias_params(input_scale: np.ndarray, weight_scale: np.ndarray, axis: int | None) -> QuantParams:
    """int32 bias params with scale = s_input * s_weight, which integer kernels add directly."""
    scale = (np.asarray(input_scale, np.float64) * np.asarray(weight_scale, np.float64)).astype(np.float32)
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    return QuantParams(scale, np.zeros(scale.shape, np.int32), "int32", axis if scale.ndim else None)


def quantize_bias(bias: np.ndarray, params: QuantParams) -> np.ndarray:
    """Round a float bias to int32 with ``params`` (saturating at the int32 range)."""
    scale = params.scale.astype(np.float64)
    q = np.rint(bias.astype(np.float64) / scale)
    return np.clip(q, np.iinfo(np.int32).min, np.iinfo(np.int32).max).astype(np.int32)


def weight_channel_axis(op_type: str, *, rank: int, trans_b: bool = False) -> int | None:
    """The output-channel axis of a weight: Conv 0, MatMul the last (N of K×N), Gemm by transB."""
    if op_type in ("Conv", "ConvTranspose"):
        return 0 if op_type == "Conv" else 1
    if op_type == "MatMul":
        return rank - 1 if rank >= 2 else None
    if op_type == "Gemm":
        return 0 if trans_b else 1
    return None
