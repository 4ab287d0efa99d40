"""NF4/FP4 weight quantization (QLoRA, bitsandbytes) with double quantization, and MatMulBnb4's layout.

NF4/FP4 codes index a 16-value table scaled by the absmax of their block of ``block_size``
weights along K (the layout conventions of :mod:`graphopt.numerics.blocks`). With double
quantization the absmax values are themselves stored as int8 in groups of 256, with one
float scale per group and one offset per tensor: 4 + 8/64 + 32/(64*256) = ~4.127 bits per
weight at block 64. com.microsoft.MatMulBnb4 reads the codes of W^T flattened, two per byte,
first value in the high nibble (the opposite of MatMulNBits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from graphopt.numerics.blocks import (
    column_chunks,
    importance_blocks,
    num_blocks,
    pack_nibbles,
    padded_blocks,
    padded_codes,
    search_shrink,
    unpack_nibbles,
)

# The 16 NF4 values of QLoRA / bitsandbytes (quantiles of N(0, 1) scaled to [-1, 1]).
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip
# bitsandbytes FP4 (e2m1, bias 3), indexed by code as ONNX Runtime's MatMulBnb4 reads it.
FP4_CODE = np.array(
    [0.0, 0.0052083333, 0.6666667, 1.0, 0.3333333, 0.5, 0.1666667, 0.25,
     -0.0, -0.0052083333, -0.6666667, -1.0, -0.3333333, -0.5, -0.1666667, -0.25],
    dtype=np.float32,
)  # fmt: skip
BNB4_TABLES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
DOUBLE_QUANT_BLOCK = 256


def nearest_code(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index into ``table`` of the value nearest to each element of ``x`` (uint8; ties go to the lower value)."""
    order = np.argsort(table, kind="stable")
    ordered = table[order]
    index = np.zeros(x.shape, np.uint8)
    for mid in (ordered[1:] + ordered[:-1]) / 2:  # 15 vectorized compares beat np.searchsorted ~5x here
        index += x > mid
    return order.astype(np.uint8)[index]


def _bnb4_decode(codes: np.ndarray, absmax: np.ndarray, table: np.ndarray) -> np.ndarray:
    return table[codes] * absmax[:, None, :]


def _bnb4_encode(blocks: np.ndarray, absmax: np.ndarray, table: np.ndarray) -> np.ndarray:
    # A block whose scale is not positive holds zeros (or a sub-rounding residue): code 0.0.
    safe = np.where(absmax > 0, absmax, np.inf)[:, None, :]
    return nearest_code(blocks / safe, table)


@dataclass(frozen=True)
class DoubleQuant:
    """Block scales stored in 8 bits: ``absmax ≈ codes * scales[i // block_size] + offset`` (QLoRA).

    bitsandbytes stores the int8 codes with its dynamic (non-linear) map; these are linear
    int8 codes in [-127, 127], which ONNX's Cast/Mul/Add can dequantize.
    """

    codes: np.ndarray
    scales: np.ndarray
    offset: float
    block_size: int = DOUBLE_QUANT_BLOCK

    def dequantize(self) -> np.ndarray:
        """The float32 absmax values, computed as the ONNX graph does (Cast, Mul, Add)."""
        scales = np.repeat(self.scales, self.block_size)[: len(self.codes)]
        return self.codes.astype(np.float32) * scales + np.float32(self.offset)


def double_quantize(values: np.ndarray, block_size: int = DOUBLE_QUANT_BLOCK) -> DoubleQuant:
    """Quantize float ``values [n]`` (block absmax) to int8 around their mean, one scale per ``block_size``."""
    offset = np.float32(values.mean()) if values.size else np.float32(0.0)
    centered = values.astype(np.float32) - offset
    padded = np.zeros(num_blocks(len(values), block_size) * block_size, np.float32)
    padded[: len(values)] = centered
    peak = np.abs(padded.reshape(-1, block_size)).max(axis=1)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(centered / np.repeat(scales, block_size)[: len(values)]), -127, 127)
    return DoubleQuant(codes.astype(np.int8), scales, float(offset), block_size)


@dataclass(frozen=True)
class Bnb4Blocks:
    """An NF4/FP4 weight: codes ``[K, N]`` (indices into the table) and the absmax ``[kb, N]`` of each block.

    ``absmax`` holds the values the kernel multiplies by, i.e. after double quantization
    when ``double`` is set; :func:`matmul_bnb4_layout` gives MatMulBnb4's inputs.
    """

    codes: np.ndarray
    absmax: np.ndarray
    quant_type: Literal["nf4", "fp4"]
    block_size: int
    double: DoubleQuant | None = None

    def dequantize(self) -> np.ndarray:
        """The float32 weight ``[K, N]`` these codes stand for."""
        blocks = _bnb4_decode(padded_codes(self.codes, self.block_size, 0), self.absmax, BNB4_TABLES[self.quant_type])
        return blocks.reshape(-1, blocks.shape[-1])

    def snap(self, row: int, values: np.ndarray) -> np.ndarray:
        """Round ``values [N]`` of weight row ``row`` onto this weight's grid (its absmax fixed)."""
        absmax = self.absmax[row // self.block_size][None, :]
        table = BNB4_TABLES[self.quant_type]
        return _bnb4_decode(_bnb4_encode(values[None, None, :], absmax, table), absmax, table)[0, 0]

    def encode(self, w: np.ndarray) -> Bnb4Blocks:
        """The same absmax with codes re-rounded from ``w [K, N]`` (e.g. GPTQ's result)."""
        codes = _bnb4_encode(padded_blocks(w, self.block_size), self.absmax, BNB4_TABLES[self.quant_type])
        return replace(self, codes=codes.reshape(w.shape))


def quantize_bnb4(
    w: np.ndarray,
    quant_type: Literal["nf4", "fp4"] = "nf4",
    block_size: int = 64,
    *,
    double_quant: bool = True,
    clip_ratios: Sequence[float] = (1.0,),
    importance: np.ndarray | None = None,
) -> Bnb4Blocks:
    """Quantize ``w [K, N]`` to NF4/FP4 with one absmax per ``block_size`` rows (K must be a multiple).

    With ``double_quant`` the absmax values are stored in 8 bits (:func:`double_quantize`)
    and the codes are chosen for the absmax values the kernel will really use.
    """
    k, n = w.shape
    if k % block_size:
        raise ValueError(f"NF4/FP4 blocks must tile K: K={k} is not a multiple of block_size={block_size}")
    table = BNB4_TABLES[quant_type]
    weight = importance_blocks(importance, k, block_size)
    absmax = np.empty((k // block_size, n), np.float32)

    for cols in column_chunks(k, n):
        blocks = padded_blocks(w[:, cols], block_size)
        peak = np.abs(blocks).max(axis=1)

        def fit(blocks: np.ndarray, shrink: float, peak: np.ndarray = peak) -> np.ndarray:
            scale = peak * np.float32(shrink)
            return _bnb4_decode(_bnb4_encode(blocks, scale, table), scale, table)

        absmax[:, cols] = peak * search_shrink(blocks, clip_ratios, weight, fit)
    double = None
    if double_quant:
        # MatMulBnb4 reads absmax in the order of the flattened W^T: column-major here.
        double = double_quantize(absmax.T.ravel())
        absmax = np.ascontiguousarray(double.dequantize().reshape(n, -1).T)
    empty = Bnb4Blocks(np.empty((0, n), np.uint8), absmax, quant_type, block_size, double)
    codes = np.empty((k, n), np.uint8)
    for cols in column_chunks(k, n):
        blocks = padded_blocks(w[:, cols], block_size)
        codes[:, cols] = _bnb4_encode(blocks, absmax[:, cols], table).reshape(k, -1)
    return replace(empty, codes=codes)


def matmul_bnb4_layout(blocks: Bnb4Blocks) -> tuple[np.ndarray, np.ndarray]:
    """``(B, absmax)`` inputs of com.microsoft.MatMulBnb4: W^T flattened, packed high nibble first."""
    packed = pack_nibbles(np.ascontiguousarray(blocks.codes.T).ravel(), high_first=True)
    return packed, np.ascontiguousarray(blocks.absmax.T).ravel()


def matmul_bnb4_dequantize(
    data: np.ndarray, absmax: np.ndarray, k: int, n: int, block_size: int, quant_type: Literal["nf4", "fp4"]
) -> np.ndarray:
    """The float32 weight ``[K, N]`` that MatMulBnb4 inputs ``(B, absmax)`` stand for."""
    codes = unpack_nibbles(data, k * n, high_first=True)
    values = BNB4_TABLES[quant_type][codes] * np.repeat(absmax, block_size)[: k * n]
    return np.ascontiguousarray(values.reshape(n, k).T)
