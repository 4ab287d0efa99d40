"""Block-wise integer weight quantization (INT4/INT8) and ONNX Runtime's MatMulNBits layout.

A weight is ``w [K, N]`` as MatMul reads it (K inputs, N outputs). Blocks run along K:
block ``b`` of column ``n`` is ``w[b*bs:(b+1)*bs, n]`` (the last one may be short, and is
padded with zeros where a layout needs whole blocks). Per channel is one block spanning K.

Integer codes follow ONNX DequantizeLinear, ``w' = (q - zp) * scale``:

- symmetric: signed codes in [-2^(b-1), 2^(b-1) - 1], no zero point. The scale maps the
  block's largest-magnitude value onto -2^(b-1) (its sign folded into the scale, which may
  be negative), so all 2^b levels are used, as ONNX Runtime's own quantizer does;
- asymmetric: unsigned codes in [0, 2^b - 1] with an integer zero point per block, over a
  range widened to contain 0, so exact zeros stay exactly zero in both modes.

Clip search tries shrinking each block's range by the factors in ``clip_ratios`` and keeps
the one with the smallest (optionally importance-weighted) squared reconstruction error.
Columns are processed in chunks, so memory stays a few chunks above the output arrays.
NF4/FP4 (QLoRA) live in :mod:`graphopt.numerics.nf4` and share these helpers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

FLOAT16_MAX = 65504.0
_CHUNK_ELEMENTS = 1 << 22  # columns per chunk so that one chunk holds ~4M weights

ScaleType = Literal["float32", "float16"]
Snap = Callable[[int, np.ndarray], np.ndarray]


def num_blocks(k: int, block_size: int) -> int:
    """How many blocks of ``block_size`` cover ``k`` rows."""
    return -(-k // block_size)


def padded_blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """``w [K, N]`` as float32 blocks ``[kb, bs, N]``, zero-padded to whole blocks."""
    k, n = w.shape
    kb = num_blocks(k, block_size)
    w = np.asarray(w, dtype=np.float32)
    if kb * block_size != k:
        w = np.concatenate([w, np.zeros((kb * block_size - k, n), np.float32)])
    return w.reshape(kb, block_size, n)


def fits_float16(scales: np.ndarray) -> bool:
    """Whether ``scales`` can be stored as float16 without overflowing."""
    return bool(np.all(np.abs(scales) <= FLOAT16_MAX))


def _round_scales(scale: np.ndarray, scale_type: ScaleType) -> np.ndarray:
    """Scales as they will be stored (float16 rounding included), never zero."""
    if scale_type == "float16" and fits_float16(scale):
        scale = scale.astype(np.float16).astype(np.float32)
    return np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)


def int_levels(bits: int, symmetric: bool) -> tuple[int, int]:
    """(qmin, qmax) of ``bits``-bit codes: signed when symmetric, unsigned otherwise."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if symmetric else (0, (1 << bits) - 1)


def _int_params(
    hi: np.ndarray, lo: np.ndarray, bits: int, symmetric: bool, shrink: np.ndarray | float, scale_type: ScaleType
) -> tuple[np.ndarray, np.ndarray | None]:
    qmin, qmax = int_levels(bits, symmetric)
    if symmetric:
        signed_max = np.where(hi >= -lo, hi, lo)
        return _round_scales(signed_max * shrink / qmin, scale_type), None
    lo = np.minimum(lo, 0.0) * shrink
    hi = np.maximum(hi, 0.0) * shrink
    scale = _round_scales((hi - lo) / (qmax - qmin), scale_type)
    zero_point = np.clip(np.rint(qmin - lo / scale), qmin, qmax)
    return scale, zero_point.astype(np.uint8)


def int_encode(blocks: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, bits: int) -> np.ndarray:
    """Codes of ``blocks [kb, bs, N]`` for the given scales: int8 if symmetric, else uint8."""
    qmin, qmax = int_levels(bits, zero_point is None)
    q = np.rint(blocks / scale[:, None, :])
    if zero_point is not None:
        q += zero_point[:, None, :]
    return np.clip(q, qmin, qmax).astype(np.int8 if zero_point is None else np.uint8)


def int_decode(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None) -> np.ndarray:
    """Float blocks ``[kb, bs, N]`` from codes ``[kb, bs, N]``."""
    q = codes.astype(np.float32)
    if zero_point is not None:
        q -= zero_point[:, None, :].astype(np.float32)
    return q * scale[:, None, :]


def search_shrink(
    blocks: np.ndarray,
    ratios: Sequence[float],
    weight: np.ndarray | None,
    fit: Callable[[np.ndarray, float], np.ndarray],
) -> np.ndarray:
    """Per block ``[kb, N]``, the ratio whose fit has the smallest error weighted by ``weight [kb, bs]``."""
    best = np.full(blocks.shape[::2], ratios[0] if len(ratios) else 1.0, np.float32)
    if len(ratios) <= 1:
        return best
    best_error = np.full(best.shape, np.inf)
    for ratio in ratios:
        diff = fit(blocks, ratio)
        diff -= blocks
        diff *= diff
        error = diff.sum(axis=1) if weight is None else np.einsum("bkn,bk->bn", diff, weight)
        better = error < best_error
        best, best_error = np.where(better, ratio, best), np.where(better, error, best_error)
    return best


def importance_blocks(importance: np.ndarray | None, k: int, block_size: int) -> np.ndarray | None:
    """Per-row importance ``[K]`` as ``[kb, bs]`` (padding rows weigh nothing), or None."""
    if importance is None:
        return None
    padded = np.zeros(num_blocks(k, block_size) * block_size, np.float32)
    padded[:k] = importance
    return padded.reshape(-1, block_size)


def column_chunks(k: int, n: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


@dataclass(frozen=True)
class IntBlocks:
    """A block-quantized weight: codes ``[K, N]``, scales ``[kb, N]``, zero points ``[kb, N]`` or None.

    This is the layout of a blocked ONNX DequantizeLinear (axis 0); see
    :func:`matmul_nbits_layout` for ONNX Runtime's MatMulNBits.
    """

    codes: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int

    @property
    def symmetric(self) -> bool:
        return self.zero_points is None

    def dequantize(self) -> np.ndarray:
        """The float32 weight ``[K, N]`` these codes stand for."""
        k = self.codes.shape[0]
        blocks = int_decode(padded_codes(self.codes, self.block_size, 0), self.scales, self.zero_points)
        return blocks.reshape(-1, blocks.shape[-1])[:k]

    def snap(self, row: int, values: np.ndarray) -> np.ndarray:
        """Round ``values [N]`` of weight row ``row`` onto this weight's grid (its scales fixed)."""
        b = row // self.block_size
        zp = None if self.zero_points is None else self.zero_points[b : b + 1]
        codes = int_encode(values[None, None, :], self.scales[b : b + 1], zp, self.bits)
        return int_decode(codes, self.scales[b : b + 1], zp)[0, 0]

    def encode(self, w: np.ndarray) -> IntBlocks:
        """The same scales with codes re-rounded from ``w [K, N]`` (e.g. GPTQ's result)."""
        codes = int_encode(padded_blocks(w, self.block_size), self.scales, self.zero_points, self.bits)
        return replace(self, codes=codes.reshape(-1, codes.shape[-1])[: w.shape[0]])


def padded_codes(codes: np.ndarray, block_size: int, fill: int) -> np.ndarray:
    """Codes ``[K, N]`` as blocks ``[kb, bs, N]``, padded with ``fill``."""
    k, n = codes.shape
    kb = num_blocks(k, block_size)
    if kb * block_size != k:
        codes = np.concatenate([codes, np.full((kb * block_size - k, n), fill, codes.dtype)])
    return codes.reshape(kb, block_size, n)


def _int_fit(
    blocks: np.ndarray,
    shrink: float,
    *,
    hi: np.ndarray,
    lo: np.ndarray,
    bits: int,
    symmetric: bool,
    scale_type: ScaleType,
) -> np.ndarray:
    """``blocks`` quantized with their range shrunk by ``shrink`` and dequantized again.

    Float-only and in place (no integer casts): the clip search runs it once per ratio.
    """
    qmin, qmax = int_levels(bits, symmetric)
    scale, zp = _int_params(hi, lo, bits, symmetric, shrink, scale_type)
    q = blocks * (1.0 / scale)[:, None, :]
    offset = None if zp is None else zp[:, None, :].astype(np.float32)
    np.rint(q, out=q)
    if offset is not None:
        q += offset
    np.clip(q, qmin, qmax, out=q)
    if offset is not None:
        q -= offset
    q *= scale[:, None, :]
    return q


def quantize_int_blocks(
    w: np.ndarray,
    bits: int,
    block_size: int,
    *,
    symmetric: bool,
    clip_ratios: Sequence[float] = (1.0,),
    importance: np.ndarray | None = None,
    scale_type: ScaleType = "float32",
) -> IntBlocks:
    """Quantize ``w [K, N]`` to ``bits``-bit codes in blocks of ``block_size`` along K.

    Args:
        w: The weight (any float array, e.g. memory-mapped); read a column chunk at a time.
        bits: 4 or 8 (any 2..8 works arithmetically).
        block_size: Rows per block; use K (or more) for one scale per output channel.
        symmetric: Signed codes without zero point, or unsigned codes with one.
        clip_ratios: Range shrink factors to try per block (1.0 alone is round-to-nearest).
        importance: Optional per-row weights ``[K]`` of the error (e.g. the Hessian diagonal).
        scale_type: How scales will be stored; float16 rounding is applied before encoding.
    """
    k, n = w.shape
    kb = num_blocks(k, block_size)
    codes = np.empty((k, n), np.int8 if symmetric else np.uint8)
    scales = np.empty((kb, n), np.float32)
    zero_points = None if symmetric else np.empty((kb, n), np.uint8)
    weight = importance_blocks(importance, k, block_size)

    for cols in column_chunks(k, n):
        blocks = padded_blocks(w[:, cols], block_size)
        hi, lo = blocks.max(axis=1), blocks.min(axis=1)
        fit = functools.partial(_int_fit, hi=hi, lo=lo, bits=bits, symmetric=symmetric, scale_type=scale_type)
        shrink = search_shrink(blocks, clip_ratios, weight, fit)
        scale, zp = _int_params(hi, lo, bits, symmetric, shrink, scale_type)
        codes[:, cols] = int_encode(blocks, scale, zp, bits).reshape(-1, blocks.shape[-1])[:k]
        scales[:, cols] = scale
        if zero_points is not None and zp is not None:
            zero_points[:, cols] = zp
    return IntBlocks(codes, scales, zero_points, bits, block_size)


def pack_nibbles(values: np.ndarray, *, high_first: bool = False) -> np.ndarray:
    """Pack 4-bit values (0..15, or -8..7) two per byte along the last axis (padded with 0).

    ONNX INT4/UINT4 tensors and MatMulNBits put the first value in the low nibble;
    MatMulBnb4 (bitsandbytes) puts it in the high nibble (``high_first``).
    """
    nibbles = values.astype(np.uint8) & 0x0F
    if nibbles.shape[-1] % 2:
        nibbles = np.concatenate([nibbles, np.zeros((*nibbles.shape[:-1], 1), np.uint8)], axis=-1)
    first, second = nibbles[..., 0::2], nibbles[..., 1::2]
    return (first << 4 | second) if high_first else (second << 4 | first)


def unpack_nibbles(packed: np.ndarray, count: int, *, high_first: bool = False) -> np.ndarray:
    """The inverse of :func:`pack_nibbles`: ``count`` unsigned 4-bit values along the last axis."""
    low, high = packed & 0x0F, packed >> 4
    pairs = np.stack([high, low] if high_first else [low, high], axis=-1)
    return pairs.reshape(*packed.shape[:-1], -1)[..., :count]


def matmul_nbits_layout(blocks: IntBlocks) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(B, scales, zero_points)`` inputs of com.microsoft.MatMulNBits for ``blocks``.

    B is uint8 ``[N, kb, bs*bits/8]`` (codes stored unsigned, 4-bit packed low nibble
    first, K padded to whole blocks); scales are ``[N, kb]``; zero points are uint8
    ``[N, ceil(kb*bits/8)]`` (4-bit packed), or None for symmetric codes, which MatMulNBits
    reads with its default zero point 2^(bits-1).
    """
    offset = 1 << (blocks.bits - 1) if blocks.symmetric else 0
    # Signed codes + 2^(bits-1), computed modulo 256 on the bytes: no wider temporary copy.
    unsigned = blocks.codes.view(np.uint8) + np.uint8(offset)
    fill = offset if blocks.symmetric else 0
    data = padded_codes(unsigned, blocks.block_size, fill).transpose(2, 0, 1)  # [N, kb, bs]
    if blocks.bits == 4:
        data = pack_nibbles(data)
    scales = np.ascontiguousarray(blocks.scales.T)
    zero_points = None
    if blocks.zero_points is not None:
        zero_points = blocks.zero_points.T
        zero_points = pack_nibbles(zero_points) if blocks.bits == 4 else np.ascontiguousarray(zero_points)
    return np.ascontiguousarray(data), scales, zero_points


def matmul_nbits_dequantize(
    data: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, bits: int, block_size: int
) -> np.ndarray:
    """The float32 weight ``[K, N]`` that MatMulNBits inputs ``(B, scales, zero_points)`` stand for."""
    n = data.shape[0]
    kb = num_blocks(k, block_size)
    codes = unpack_nibbles(data, block_size) if bits == 4 else data.reshape(n, kb, block_size)
    scales = scales.reshape(n, kb)
    if zero_points is None:
        zp = np.full((n, kb), 1 << (bits - 1), np.float32)
    else:
        zp = unpack_nibbles(zero_points, kb) if bits == 4 else zero_points.reshape(n, kb)
    w = (codes.astype(np.float32) - zp[..., None].astype(np.float32)) * scales[..., None]
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)
