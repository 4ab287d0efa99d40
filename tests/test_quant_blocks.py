from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits, quantize_matmul_bnb4

from graphopt.numerics import blocks as qb
from graphopt.numerics import nf4

SHAPES = st.tuples(st.integers(1, 80), st.integers(1, 12))
BLOCKS = st.sampled_from([16, 32, 64])
SCALE_TYPES = st.sampled_from(["float32", "float16"])


def _weight(shape: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(
    SHAPES, st.sampled_from([4, 8]), BLOCKS, st.booleans(), st.sampled_from(["float32", "float16"]), st.integers(0, 9)
)
def test_int_blocks_stay_in_range_and_within_one_step(
    shape: tuple[int, int], bits: int, block: int, symmetric: bool, scale_type: str, seed: int
) -> None:
    w = _weight(shape, seed)
    w[0, 0] = 0.0
    blocks = qb.quantize_int_blocks(w, bits, block, symmetric=symmetric, scale_type=scale_type)  # type: ignore[arg-type]
    qmin, qmax = qb.int_levels(bits, symmetric)
    assert blocks.codes.min() >= qmin and blocks.codes.max() <= qmax
    assert blocks.scales.shape == (qb.num_blocks(shape[0], block), shape[1])
    step = np.repeat(np.abs(blocks.scales), block, axis=0)[: shape[0]]
    # At most one step off (the extreme of the other sign is clipped in symmetric mode); zeros stay zeros.
    assert np.all(np.abs(blocks.dequantize() - w) <= step * 1.001 + 1e-7)
    assert blocks.dequantize()[0, 0] == 0.0
    if scale_type == "float16":
        assert np.array_equal(blocks.scales.astype(np.float16).astype(np.float32), blocks.scales)


@settings(max_examples=30, deadline=None)
@given(SHAPES, st.sampled_from([4, 8]), BLOCKS, st.booleans(), st.integers(0, 9))
def test_matmul_nbits_layout_round_trips(
    shape: tuple[int, int], bits: int, block: int, symmetric: bool, seed: int
) -> None:
    blocks = qb.quantize_int_blocks(_weight(shape, seed), bits, block, symmetric=symmetric)
    data, scales, zero_points = qb.matmul_nbits_layout(blocks)
    kb = qb.num_blocks(shape[0], block)
    assert data.shape == (shape[1], kb, block * bits // 8) and data.dtype == np.uint8
    assert scales.shape == (shape[1], kb)
    assert (zero_points is None) == symmetric
    restored = qb.matmul_nbits_dequantize(data, scales, zero_points, shape[0], bits, block)
    np.testing.assert_array_equal(restored, blocks.dequantize())


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (8, False)])
def test_round_to_nearest_matches_onnxruntime_quantizer(bits: int, symmetric: bool) -> None:
    """Without clip search the codes are ORT's own (MLAS blockwise quantization), bit for bit."""
    k, n, block = 128, 24, 32
    w = _weight((k, n), 3)
    ours = qb.quantize_int_blocks(w, bits, block, symmetric=symmetric)
    packed = np.zeros((n, k // block, block * bits // 8), np.uint8)
    scales = np.zeros((n, k // block), np.float32)
    zero_points = np.zeros((n, (k // block * bits + 7) // 8), np.uint8)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, w, scales, zero_points, block, n, k, symmetric)
    theirs = qb.matmul_nbits_dequantize(packed, scales, None if symmetric else zero_points, k, bits, block)
    np.testing.assert_array_equal(ours.dequantize(), theirs)


def test_clip_search_never_loses_to_round_to_nearest() -> None:
    w = _weight((256, 64), 4)
    w[::7] *= 6.0  # outliers: where clipping pays
    importance = np.random.default_rng(5).uniform(0.1, 3.0, 256).astype(np.float32)
    for kwargs in ({}, {"importance": importance}):
        weight = kwargs.get("importance", np.ones(256, np.float32))
        rtn = qb.quantize_int_blocks(w, 4, 32, symmetric=True, **kwargs)
        clipped = qb.quantize_int_blocks(w, 4, 32, symmetric=True, clip_ratios=(1.0, 0.9, 0.8, 0.7), **kwargs)
        error = [float((((b.dequantize() - w) ** 2) * weight[:, None]).sum()) for b in (rtn, clipped)]
        assert error[1] < error[0]


def test_snap_and_encode_agree_with_quantize() -> None:
    w = _weight((64, 16), 6)
    for blocks in (qb.quantize_int_blocks(w, 4, 32, symmetric=False), nf4.quantize_bnb4(w, "nf4", 32)):
        rows = np.stack([blocks.snap(r, w[r]) for r in range(64)])
        np.testing.assert_array_equal(rows, blocks.dequantize())
        np.testing.assert_array_equal(blocks.encode(blocks.dequantize()).codes, blocks.codes)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1.5, 1.5, width=32), min_size=1, max_size=50), st.sampled_from(["nf4", "fp4"]))
def test_nearest_code_is_the_nearest_value(values: list[float], quant_type: str) -> None:
    table = nf4.BNB4_TABLES[quant_type]
    x = np.array(values, np.float32)
    got = table[nf4.nearest_code(x, table)]
    best = np.abs(x[:, None] - table[None, :]).min(axis=1)
    np.testing.assert_allclose(np.abs(got - x), best, atol=1e-7)


@pytest.mark.parametrize(("quant_type", "code"), [("nf4", 1), ("fp4", 0)])
def test_bnb4_matches_onnxruntime_quantizer(quant_type: str, code: int) -> None:
    k, n, block = 128, 48, 64
    w = _weight((k, n), 7)
    blocks = nf4.quantize_bnb4(w, quant_type, block, double_quant=False)  # type: ignore[arg-type]
    data, absmax = nf4.matmul_bnb4_layout(blocks)
    packed, theirs = np.zeros((k * n + 1) // 2, np.uint8), np.zeros(k * n // block, np.float32)
    quantize_matmul_bnb4(packed, np.ascontiguousarray(w.T), theirs, block, code, n, k)
    np.testing.assert_array_equal(absmax, theirs)
    ours = nf4.matmul_bnb4_dequantize(data, absmax, k, n, block, quant_type)  # type: ignore[arg-type]
    np.testing.assert_array_equal(ours, blocks.dequantize())
    # ORT's FP4 thresholds are not exact midpoints; ours is never farther from the weight.
    reference = nf4.matmul_bnb4_dequantize(packed, theirs, k, n, block, quant_type)  # type: ignore[arg-type]
    assert np.all(np.abs(ours - w) <= np.abs(reference - w) + 1e-7)
    if quant_type == "nf4":
        np.testing.assert_array_equal(data, packed)


def test_double_quantization_costs_4_127_bits_and_little_error() -> None:
    w = _weight((1024, 256), 8)
    single = nf4.quantize_bnb4(w, "nf4", 64, double_quant=False)
    double = nf4.quantize_bnb4(w, "nf4", 64)
    assert double.double is not None and double.double.codes.dtype == np.int8
    stored = len(double.double.codes) + 4 * len(double.double.scales) + 4  # int8 absmax, float scales, offset
    bits = (w.size / 2 + stored) * 8 / w.size
    assert 4.125 < bits < 4.13
    np.testing.assert_allclose(double.absmax.T.ravel(), double.double.dequantize())
    errors = [np.linalg.norm(b.dequantize() - w) / np.linalg.norm(w) for b in (single, double)]
    assert errors[1] < errors[0] * 1.01


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 700), st.integers(0, 9))
def test_double_quantize_error_is_half_a_step(count: int, seed: int) -> None:
    values = np.random.default_rng(seed).uniform(0.01, 2.0, count).astype(np.float32)
    double = nf4.double_quantize(values)
    steps = np.repeat(double.scales, nf4.DOUBLE_QUANT_BLOCK)[:count]
    assert np.all(np.abs(double.dequantize() - values) <= steps / 2 * 1.001 + 1e-7)


@pytest.mark.parametrize("high_first", [False, True])
def test_nibble_packing_round_trips(high_first: bool) -> None:
    values = np.random.default_rng(9).integers(0, 16, (3, 7)).astype(np.uint8)
    packed = qb.pack_nibbles(values, high_first=high_first)
    assert packed.shape == (3, 4)
    np.testing.assert_array_equal(qb.unpack_nibbles(packed, 7, high_first=high_first), values)
    first = packed[0, 0] >> 4 if high_first else packed[0, 0] & 0x0F
    assert first == values[0, 0]


def test_large_weights_keep_float32_scales_and_bnb4_needs_whole_blocks() -> None:
    w = _weight((32, 4), 10) * 1e6
    blocks = qb.quantize_int_blocks(w, 4, 32, symmetric=True, scale_type="float16")
    assert not qb.fits_float16(blocks.scales)
    assert np.abs(blocks.dequantize() - w).max() <= np.abs(blocks.scales).max() * 1.001
    with pytest.raises(ValueError, match="K=40 is not a multiple of block_size=32"):
        nf4.quantize_bnb4(_weight((40, 4), 11), "nf4", 32)
