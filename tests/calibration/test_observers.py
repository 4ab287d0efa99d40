from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from graphopt import io
from graphopt.calibration.histogram import StreamingHistogram
from graphopt.calibration.observers import (
    HistogramObserver,
    MinMaxObserver,
    ObserverConfig,
    make_observer,
    observe_ranges,
)
from graphopt.calibration.sources import DataSpec, input_specs, iter_batches

METHODS = ["minmax", "percentile", "entropy", "mse"]
CLIPPING = ["percentile", "entropy", "mse"]


def _observe(config: ObserverConfig, *batches: np.ndarray) -> MinMaxObserver | HistogramObserver:
    observer = make_observer(config)
    for batch in batches:
        observer.update(batch)
    return observer


def _fake_quant_mse(x: np.ndarray, rmin: float, rmax: float, symmetric: bool, bits: int = 8) -> float:
    """Mean squared error of quantizing ``x`` to ``bits`` bits over the range, as a quantizer would."""
    x = x.astype(np.float64)
    if symmetric:
        qmax = (1 << (bits - 1)) - 1
        scale = max(abs(rmin), abs(rmax)) / qmax
        restored = np.clip(np.round(x / scale), -qmax, qmax) * scale
    else:
        lo, hi = min(rmin, 0.0), max(rmax, 0.0)
        scale = (hi - lo) / ((1 << bits) - 1)
        zero_point = np.round(-lo / scale)
        restored = (np.clip(np.round(x / scale) + zero_point, 0, (1 << bits) - 1) - zero_point) * scale
    return float(np.mean((restored - x) ** 2))


def _array_shapes(obj: object) -> list[tuple[int, ...]]:
    """The shapes of every numpy array an object holds, through nested objects."""
    shapes = []
    for value in vars(obj).values():
        if isinstance(value, np.ndarray):
            shapes.append(value.shape)
        elif hasattr(value, "__dict__") and not isinstance(value, (ObserverConfig, type)):
            shapes.extend(_array_shapes(value))
    return shapes


# --- minmax -------------------------------------------------------------------------------


def test_minmax_is_exact_over_batches() -> None:
    observer = _observe(ObserverConfig(), np.array([[0.5, -2.0], [3.0, 1.0]]), np.array([7.25, -1.0, 0.0]))
    assert observer.range() == (-2.0, 7.25)
    symmetric = _observe(ObserverConfig(symmetric=True), np.array([-9.5, 1.0]), np.array([3.0]))
    assert symmetric.range() == (-9.5, 9.5)


def test_minmax_does_not_force_zero_into_the_range() -> None:
    assert _observe(ObserverConfig(), np.array([3.0, 5.0])).range() == (3.0, 5.0)


def test_moving_average_follows_pytorch() -> None:
    observer = _observe(
        ObserverConfig(moving_average=0.5),
        np.array([-1.0, 1.0]),  # the first batch sets the range
        np.array([-3.0, 5.0]),  # then min += 0.5 * (-3 - -1), max += 0.5 * (5 - 1)
        np.array([0.0, 1.0]),  # min += 0.5 * (0 - -2), max += 0.5 * (1 - 3)
    )
    assert observer.range() == (-1.0, 2.0)


def test_moving_average_damps_a_single_outlier_batch() -> None:
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal(1000) for _ in range(50)]
    batches[25] = np.append(batches[25], 100.0)
    averaged = _observe(ObserverConfig(moving_average=0.01), *batches).range()
    assert _observe(ObserverConfig(), *batches).range()[1] == 100.0
    assert averaged[1] < 10.0


# --- streaming ------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_many_small_batches_give_the_one_batch_range(method: str, symmetric: bool) -> None:
    rng = np.random.default_rng(1)
    data = np.concatenate([rng.standard_normal(150_000), rng.laplace(2.0, 3.0, 50_000)]).astype(np.float32)
    rng.shuffle(data)
    # Cut so that the range grows many times: the first batches are narrow, later ones wide.
    cuts = np.sort(rng.choice(np.arange(1, data.size), 299, replace=False))
    config = ObserverConfig(method=method, symmetric=symmetric)
    whole = _observe(config, data)
    streamed = _observe(config, *np.split(data, cuts))
    width = whole.histogram.bin_width if isinstance(whole, HistogramObserver) else 0.0
    np.testing.assert_allclose(streamed.range(), whole.range(), rtol=0, atol=width)


def test_histogram_counts_do_not_depend_on_batching() -> None:
    rng = np.random.default_rng(2)
    data = rng.standard_normal(20_000) * np.geomspace(1e-3, 1e3, 20_000)
    whole, streamed = StreamingHistogram(256), StreamingHistogram(256)
    whole.update(data)
    for batch in np.array_split(data, 97):
        streamed.update(batch)
    assert streamed.bin_width == whole.bin_width
    shift = streamed.start - whole.start
    assert shift >= 0
    np.testing.assert_array_equal(streamed.counts[: streamed.bins - shift], whole.counts[shift:])
    counts, _ = np.histogram(data, bins=whole.edges())
    np.testing.assert_array_equal(whole.counts, counts)


def test_percentile_matches_numpy_within_a_bin() -> None:
    rng = np.random.default_rng(3)
    data = rng.gamma(2.0, size=300_000) - 1.0
    observer = _observe(ObserverConfig(method="percentile", percentile=99.9), *np.array_split(data, 30))
    width = observer.histogram.bin_width
    np.testing.assert_allclose(observer.range(), np.percentile(data, [0.1, 99.9]), rtol=0, atol=width)
    symmetric = _observe(ObserverConfig(method="percentile", percentile=99.9, symmetric=True), data)
    t = np.percentile(np.abs(data), 99.9)
    np.testing.assert_allclose(symmetric.range(), (-t, t), rtol=0, atol=symmetric.histogram.bin_width)


def test_percentile_100_is_the_observed_range() -> None:
    data = np.random.default_rng(4).standard_normal(10_000)
    observer = _observe(ObserverConfig(method="percentile", percentile=100.0), data)
    assert observer.range() == (data.min(), data.max())


# --- clipping -------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
def test_outliers_are_clipped_except_by_minmax(symmetric: bool) -> None:
    rng = np.random.default_rng(5)
    data = rng.standard_normal(4_000_000).astype(np.float32)
    data[:3] = 1000.0
    ranges = {m: _observe(ObserverConfig(method=m, symmetric=symmetric), data).range() for m in METHODS}
    assert ranges["minmax"][1] == 1000.0
    # MSE trades the outliers' clipping error against everyone's rounding error, so it clips
    # less than the others; the percentile ignores 0.001% of the values, so only the bulk counts.
    assert ranges["mse"][1] < 400.0
    assert ranges["entropy"][1] < 130.0  # 128 levels need 128 bins of the 2048 over [0, 1000]
    assert ranges["percentile"][1] < 5.0
    for method in CLIPPING:
        rmin, rmax = ranges[method]
        assert rmin == -rmax if symmetric else rmin >= float(data.min())


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_range_quantizes_heavy_tails_better_than_minmax(symmetric: bool) -> None:
    data = np.random.default_rng(6).laplace(0.5, 1.0, 200_000).astype(np.float32)
    mse_range = _observe(ObserverConfig(method="mse", symmetric=symmetric), *np.array_split(data, 8)).range()
    minmax_range = _observe(ObserverConfig(symmetric=symmetric), data).range()
    mse_error = _fake_quant_mse(data, *mse_range, symmetric)
    assert mse_error < 0.85 * _fake_quant_mse(data, *minmax_range, symmetric)
    # And no clipping found by brute force on the data itself does better.
    if symmetric:
        pairs = [(-t, t) for t in np.linspace(4.0, float(np.abs(data).max()), 100)]
    else:
        pairs = [(lo, hi) for lo in np.linspace(-11.0, -7.0, 15) for hi in np.linspace(7.0, 11.0, 15)]
    assert mse_error < 1.005 * min(_fake_quant_mse(data, lo, hi, symmetric) for lo, hi in pairs)


def test_mse_clips_a_gaussian_near_the_known_optimum() -> None:
    # For 8-bit symmetric quantization of N(0, 1) the MSE-optimal clipping is about 3.9 sigma
    # (Banner et al., "ACIQ"), well inside the observed maximum of a million samples.
    data = np.random.default_rng(7).standard_normal(1_000_000)
    t = _observe(ObserverConfig(method="mse", symmetric=True), data).range()[1]
    assert 3.6 < t < 4.2


@pytest.mark.parametrize("method", METHODS)
def test_post_relu_data_keeps_rmin_non_negative_when_asymmetric(method: str) -> None:
    data = np.maximum(np.random.default_rng(8).standard_normal(200_000), 0.0)
    rmin, rmax = _observe(ObserverConfig(method=method), data).range()
    assert rmin >= 0.0
    assert 0.0 < rmax <= data.max()
    srmin, srmax = _observe(ObserverConfig(method=method, symmetric=True), data).range()
    assert srmin == -srmax < 0.0


def test_entropy_asymmetric_spends_all_levels_on_one_sided_data() -> None:
    # uint8 spends 256 levels on [0, t] of a post-ReLU tensor, a symmetric int8 only 128:
    # with twice the levels, clipping pays less, so the asymmetric threshold is not lower.
    data = np.maximum(np.random.default_rng(9).laplace(0.0, 1.0, 500_000), 0.0)
    asymmetric = _observe(ObserverConfig(method="entropy"), data)
    symmetric = _observe(ObserverConfig(method="entropy", symmetric=True), data)
    assert asymmetric.range()[1] >= symmetric.range()[1] - asymmetric.histogram.bin_width


# --- memory, bad values, edge cases ------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_memory_does_not_grow_with_updates(method: str) -> None:
    rng = np.random.default_rng(10)
    observer = make_observer(ObserverConfig(method=method))
    observer.update(rng.standard_normal(1000))
    after_one = _array_shapes(observer)
    for i in range(199):
        observer.update(rng.standard_normal(1000) * 1.05**i + i)  # the range keeps growing
    assert _array_shapes(observer) == after_one
    if isinstance(observer, HistogramObserver):
        assert after_one == [(2048,)]
        assert observer.histogram.total == 200_000


@pytest.mark.parametrize("method", METHODS)
def test_nan_and_inf_are_ignored_and_logged_once(method: str, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(11)
    clean = rng.standard_normal((2, 5000)).astype(np.float32)
    dirty = clean.copy()
    dirty[0, :3] = [np.nan, np.inf, -np.inf]
    dirty[1, 7] = np.nan
    config = ObserverConfig(method=method)
    expected = _observe(config, clean[0][3:], clean[1][np.arange(5000) != 7]).range()
    with caplog.at_level(logging.DEBUG, logger="graphopt.calibration.observers"):
        observer = _observe(config, *dirty)
    assert observer.range() == expected
    assert observer.nonfinite == 4
    assert len([r for r in caplog.records if "NaN/inf" in r.getMessage()]) == 1


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_no_finite_value_gives_a_zero_range(method: str, symmetric: bool) -> None:
    config = ObserverConfig(method=method, symmetric=symmetric)
    assert make_observer(config).range() == (0.0, 0.0)
    assert _observe(config, np.array([np.nan, np.inf]), np.zeros((0, 3), np.float32)).range() == (0.0, 0.0)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_constant_and_integer_tensors(method: str, symmetric: bool) -> None:
    config = ObserverConfig(method=method, symmetric=symmetric)
    assert _observe(config, np.zeros(100, np.float32)).range() == (0.0, 0.0)
    rmin, rmax = _observe(config, np.full(100, 2.5)).range()
    assert rmax == 2.5 and rmin == (-2.5 if symmetric else 2.5)
    rmin, rmax = _observe(config, np.arange(-3, 10, dtype=np.int64)).range()
    assert rmin >= -9 and 0 < rmax <= 9


@pytest.mark.parametrize("method", CLIPPING)
def test_full_histogram_range_search_is_fast(method: str) -> None:
    # Uniform data over a span that fits exactly: every one of the 2048 bins is occupied.
    data = np.random.default_rng(12).uniform(-1024.0, 1023.999, 1_000_000)
    for symmetric in (False, True):
        observer = _observe(ObserverConfig(method=method, symmetric=symmetric), data)
        start = time.perf_counter()
        rmin, rmax = observer.range()
        assert time.perf_counter() - start < 0.5
        assert -1024.0 <= rmin < rmax <= 1024.0


# --- configuration --------------------------------------------------------------------------

BAD_CONFIGS = [
    (
        {"method": "kl"},
        "ObserverConfig.method must be one of 'minmax', 'percentile', 'entropy', 'mse'; got 'kl'.",
    ),
    ({"percentile": 0.0}, "ObserverConfig.percentile must be in (0, 100], e.g. 99.99; got 0.0."),
    ({"percentile": 100.5}, "ObserverConfig.percentile must be in (0, 100], e.g. 99.99; got 100.5."),
    (
        {"method": "percentile", "percentile": 30.0},
        "ObserverConfig.percentile must be at least 50 for an asymmetric range, which keeps the values between "
        "percentiles 100 - p and p; got 30.0. Or set symmetric=True to clip |x|.",
    ),
    ({"bins": 64}, "ObserverConfig.bins must be an integer >= 128; got 64."),
    ({"bins": 2048.0}, "ObserverConfig.bins must be an integer >= 128; got 2048.0."),
    ({"num_bits": 1}, "ObserverConfig.num_bits must be an integer in 2..16; got 1."),
    ({"num_bits": 17}, "ObserverConfig.num_bits must be an integer in 2..16; got 17."),
    ({"moving_average": 0.0}, "ObserverConfig.moving_average must be None or in (0, 1), e.g. 0.01; got 0.0."),
    ({"moving_average": 1.0}, "ObserverConfig.moving_average must be None or in (0, 1), e.g. 0.01; got 1.0."),
    (
        {"method": "mse", "moving_average": 0.1},
        "ObserverConfig.moving_average applies to method 'minmax' only; got method 'mse'. "
        "Remove moving_average or use method='minmax'.",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CONFIGS)
def test_bad_configs_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ObserverConfig(**kwargs)  # type: ignore[arg-type]


def test_good_configs_are_accepted() -> None:
    ObserverConfig(method="percentile", percentile=30.0, symmetric=True)
    ObserverConfig(percentile=100.0, bins=128, num_bits=16, moving_average=0.5)
    ObserverConfig(method="entropy", num_bits=2, bins=100_000, unsigned=False)


# --- end to end through ONNX Runtime ---------------------------------------------------------


def _tiny_model(tmp_path: Path) -> Path:
    """y = Relu(2 * x): the observed tensors are x, h = 2 * x and y."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "two"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    path = tmp_path / "tiny.onnx"
    onnx.save(model, path)
    return path


def test_observe_ranges_end_to_end(tmp_path: Path) -> None:
    model = io.load_model(_tiny_model(tmp_path))
    data = DataSpec(samples=16, batch_size=4, seed=3)
    x = np.concatenate([b["x"] for b in iter_batches(data, input_specs(model))])
    lo, hi = float(x.min()), float(x.max())

    ranges = observe_ranges(model, data, ["x", "h", "y"], ObserverConfig())
    assert ranges == {"x": (lo, hi), "h": (2 * lo, 2 * hi), "y": (0.0, 2 * hi)}

    configs = {
        "x": ObserverConfig(symmetric=True),
        "h": ObserverConfig(method="percentile", percentile=100.0),
        "y": ObserverConfig(method="mse"),
    }
    per_tensor = observe_ranges(model, data, ["h", "x", "y"], configs, group_size=2, threads=1)
    assert per_tensor["x"] == (-max(-lo, hi), max(-lo, hi))
    assert per_tensor["h"] == (2 * lo, 2 * hi)
    assert per_tensor["y"][0] == 0.0 and 0.0 < per_tensor["y"][1] <= 2 * hi
    assert [v.name for v in model.graph.outputs] == ["y"]  # the model is left as it was


def test_observe_ranges_needs_a_config_per_tensor(tmp_path: Path) -> None:
    model = io.load_model(_tiny_model(tmp_path))
    with pytest.raises(ValueError, match=re.escape("no ObserverConfig for tensor(s) ['h']; give one per tensor")):
        observe_ranges(model, DataSpec(samples=2), ["x", "h"], {"x": ObserverConfig()})


def test_a_fixed_batch_dim_sets_the_batch_size(tmp_path: Path) -> None:
    """Exporters fix the batch dim ([1, 3, H, W]): data is fed that many samples at a time, not the recipe's."""
    from graphopt.calibration.sources import DataSpec, InputSpec, iter_batches

    fixed = [InputSpec("x", np.dtype(np.float32), (1, 3, 8, 8))]
    batches = list(iter_batches(DataSpec(samples=6, batch_size=4), fixed))
    assert [b["x"].shape for b in batches] == [(1, 3, 8, 8)] * 6
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 3, 8, 8), np.float32))
    given = list(iter_batches(DataSpec(source=tmp_path / "d.npz", samples=5, batch_size=4), fixed))
    assert [b["x"].shape[0] for b in given] == [1] * 5
    symbolic = [InputSpec("x", np.dtype(np.float32), ("batch", 3))]
    assert [b["x"].shape[0] for b in iter_batches(DataSpec(samples=6, batch_size=4), symbolic)] == [4, 2]
