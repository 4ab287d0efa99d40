"""Property tests of the quantization arithmetic (graphopt.numerics.affine)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from graphopt.numerics import affine as quant

finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
qtypes = st.sampled_from(["int8", "uint8", "int16", "uint16"])


@settings(max_examples=200, deadline=None)
@given(lo=finite, hi=finite, qtype=qtypes, symmetric=st.booleans(), data=st.data())
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(
    lo: float, hi: float, qtype: str, symmetric: bool, data: st.DataObject
) -> None:
    lo, hi = min(lo, hi), max(lo, hi)
    params = quant.compute_params(lo, hi, qtype, symmetric=symmetric)
    scale = float(params.scale)
    rmin, rmax = min(lo, 0.0), max(hi, 0.0)
    x = data.draw(arrays(np.float32, 16, elements=st.floats(rmin, rmax, width=32)))
    error = np.abs(params.dequantize(params.quantize(x)) - x)
    # Half a step, plus float32 rounding of x / scale and of the product.
    assert np.all(error <= scale / 2 + 1e-5 * max(abs(rmin), abs(rmax), scale))


@settings(max_examples=200, deadline=None)
@given(lo=finite, hi=finite, qtype=qtypes, symmetric=st.booleans())
def test_zero_is_exact(lo: float, hi: float, qtype: str, symmetric: bool) -> None:
    params = quant.compute_params(min(lo, hi), max(lo, hi), qtype, symmetric=symmetric)
    assert params.dequantize(params.quantize(np.zeros(4, np.float32))).tolist() == [0.0] * 4


@settings(max_examples=100, deadline=None)
@given(
    weight=arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3)), elements=finite),
    axis=st.integers(0, 2),
)
def test_per_channel_scales_follow_the_axis(weight: np.ndarray, axis: int) -> None:
    params = quant.weight_params(weight, "int8", axis=axis, symmetric=True)
    assert params.scale.shape == (weight.shape[axis],)
    restored = params.dequantize(params.quantize(weight))
    steps = np.expand_dims(params.scale, tuple(i for i in range(weight.ndim) if i != axis))
    assert np.all(np.abs(restored - weight) <= steps / 2 + 1e-5 * np.abs(weight).max(initial=1.0))
    assert np.all(restored[weight == 0] == 0)


def test_reduce_range_and_symmetric_ranges() -> None:
    assert quant.qrange("int8", symmetric=True) == (-127, 127)
    assert quant.qrange("int8", symmetric=False, reduce_range=True) == (-64, 63)
    assert quant.qrange("uint8", symmetric=False, reduce_range=True) == (0, 127)


def test_bias_scale_is_product_of_input_and_weight_scales() -> None:
    params = quant.bias_params(np.float32(0.5), np.array([0.1, 0.2], np.float32), axis=0)
    np.testing.assert_allclose(params.scale, [0.05, 0.1])
    assert quant.quantize_bias(np.array([1.0, -1.0]), params).tolist() == [20, -10]
