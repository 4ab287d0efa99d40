"""Latency budget: layers whose int8 form does not pay go back to float; when no placement pays, the step is dropped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphopt import cli, registry, render, runtime, speed
from graphopt.calibration.sources import DataSpec
from graphopt.passes.quantize import QuantizeConfig
from graphopt.pipeline import optimize

DATA = Path(__file__).resolve().parents[1] / "graphopt" / "data"
DIGITS = DATA / "digits_cnn.onnx"


def _calib() -> DataSpec:
    return DataSpec(source=str(DATA / "digits_calib.npz"), samples=32, batch_size=16)


def _recipe(limit: float) -> dict[str, object]:
    return {
        "passes": ["fold", "quantize"],
        "verify": {"samples": 16, "batch_size": 16, "latency_runs": 5},
        "budget": {"min_cosine": 0.9, "max_latency_ratio": limit},
    }


def test_a_latency_budget_that_holds_needs_no_search() -> None:
    result = optimize(DIGITS, _recipe(100.0), calibration=_calib())
    found = result.report.speed
    assert found is not None and found["passed"] and not found["tried"] and not found["dropped"]
    assert result.report.passes[1].modified  # quantize kept
    assert "met" in speed.summary(found)


def test_no_placement_within_the_limit_drops_the_step_and_the_run_says_why() -> None:
    """No int8 model runs at 1% of the input's time: quantize is dropped and the output is the exact model."""
    result = optimize(DIGITS, _recipe(0.01), calibration=_calib())
    found = result.report.speed
    assert found is not None and found["dropped"] and not found["passed"]
    quantize = result.report.passes[1]
    assert not quantize.modified and "latency budget" in quantize.details["skipped"]
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in result.model.graph)
    folded = optimize(DIGITS, {"passes": ["fold"], "verify": {"enabled": False}}).model
    feeds = {"input": np.load(DATA / "digits_calib.npz")["input"][:8]}
    got = runtime.create_session(result.model).run(None, feeds)[0]
    want = runtime.create_session(folded).run(None, feeds)[0]
    np.testing.assert_array_equal(got, want)
    warnings = " ".join(render.outcome_warnings(result.report))
    assert "nothing was compressed" in warnings and "quantize does not pay" in warnings


def _quantized_digits() -> tuple[registry.PassSpec, QuantizeConfig, ir.Model, object, ir.Model]:
    before = optimize(DIGITS, {"passes": ["fold"], "verify": {"enabled": False}}).model
    spec = registry.REGISTRY["quantize"]
    config = QuantizeConfig(mode="static")
    statistics = spec.collect(before, _calib(), config)
    candidate = before.clone()
    spec.apply(candidate, config, statistics)
    return spec, config, before, statistics, candidate


def _int8_spatial_convs(model: ir.Model) -> int:
    """Convolutions with a kernel wider than 1 that read a DequantizeLinear."""
    return sum(
        any(v.producer() is not None and v.producer().op_type == "DequantizeLinear" for v in n.inputs if v)
        for n in model.graph
        if n.op_type == "Conv" and n.inputs[1].const_value is None and n.attributes.get_ints("kernel_shape", [3])[0] > 1
    )


def test_the_search_puts_back_only_the_layer_class_that_pays_in_float() -> None:
    spec, config, before, statistics, candidate = _quantized_digits()
    # A stand-in for the clock: int8 spatial convolutions cost, the other int8 layers do not.
    result, chosen = speed.search(
        spec, config, before, statistics, candidate, lambda m: 0.6 + 0.2 * _int8_spatial_convs(m), 1.6, 1.0
    )
    assert chosen is not None
    new_config = chosen[0]
    convs = speed.classes(before, spec, config)["spatial convolutions"]
    assert result.passed
    assert sorted(result.float_nodes) == sorted(convs)
    assert [t["trial"] for t in result.tried if t["kept"]] == ["in float: spatial convolutions"]
    others = [n.name for n in before.graph if n.op_type in ("Gemm", "Conv") and n.name not in convs]
    assert others and not set(others) & set(new_config.exclude)  # they stay int8: putting them back never paid


def test_the_search_drops_the_step_when_float_never_gains() -> None:
    spec, config, before, statistics, candidate = _quantized_digits()
    result, chosen = speed.search(spec, config, before, statistics, candidate, lambda m: 1.5, 1.5, 1.0)
    assert chosen is None and result.dropped and "quantize does not pay" in result.reason
    assert all(not t["kept"] for t in result.tried) and result.tried  # every class was timed


@pytest.mark.parametrize(
    ("op_type", "weight_shape", "group", "expected"),
    [
        ("Conv", (8, 1, 3, 3), 8, "depthwise convolutions"),
        ("Conv", (8, 2, 3, 3), 4, "grouped convolutions"),
        ("Conv", (8, 4, 1, 1), 1, "pointwise convolutions"),
        ("Conv", (8, 4, 3, 3), 1, "spatial convolutions"),
        ("MatMul", (4, 8), 1, "weight products (MatMul)"),
        ("MatMul", None, 1, "activation products (MatMul)"),
        ("Gemm", (4, 8), 1, "Gemm"),
    ],
)
def test_layer_classes(op_type: str, weight_shape: tuple[int, ...] | None, group: int, expected: str) -> None:
    x = ir.Value(name="x")
    if weight_shape is None:
        w = ir.Value(name="w")
    else:
        w = ir.Value(name="w", const_value=ir.tensor(np.zeros(weight_shape, np.float32)))
    attributes = [ir.AttrInt64("group", group)] if op_type == "Conv" else []
    node = ir.Node("", op_type, [x, w], attributes=attributes)
    assert speed.layer_class(node) == expected


def test_within_allows_the_measurement_noise() -> None:
    assert speed.within(1.015, 1.0) and not speed.within(1.03, 1.0)


def test_a_limit_up_to_1_asks_for_speed_and_one_above_trades_it_for_size() -> None:
    assert speed.bar(1.0, 0.7) == 0.7 and speed.bar(0.9, 0.95) == 0.9 and speed.bar(1.0, None) == 1.0
    assert speed.bar(1.5, 0.7) == 1.5  # the user accepts a slower output: only the limit binds


def test_the_cli_takes_a_latency_budget_and_refuses_one_no_model_can_meet(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o.onnx"
    with pytest.raises(SystemExit) as exited:
        cli.main(["optimize", str(DIGITS), "-o", str(out), "--max-latency-ratio", "0"])
    text = " ".join(capsys.readouterr().err.split())
    assert exited.value.code == 2 and "--max-latency-ratio" in text and "must be between" in text
    assert not out.exists()


def _quantize_nodes(model: ir.Model) -> int:
    return sum(n.op_type == "QuantizeLinear" for n in model.graph)


def _conv_softmax() -> tuple[registry.PassSpec, QuantizeConfig, ir.Model, object, ir.Model, DataSpec]:
    """Conv -> Softmax: with integer islands the Conv's output stays float (no quantized op reads it)."""
    rng = np.random.default_rng(0)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            onnx.helper.make_node("Softmax", ["c"], ["y"], name="softmax", axis=1),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 8, 8])],
        [onnx.numpy_helper.from_array(rng.normal(size=(8, 4, 3, 3)).astype(np.float32), "w")],
    )
    before = ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    data = DataSpec(source={"x": rng.normal(size=(8, 4, 8, 8)).astype(np.float32)}, samples=8, batch_size=1)
    spec = registry.REGISTRY["quantize"]
    config = QuantizeConfig(mode="static")
    statistics = spec.collect(before, data, config)
    candidate = before.clone()
    spec.apply(candidate, config, statistics)
    return spec, config, before, statistics, candidate, data


@pytest.mark.parametrize("accuracy", [0.5, 2.0])
def test_a_faster_placement_is_kept_only_within_the_accuracy_budget(accuracy: float) -> None:
    """quantize's fusing placement when the recipe's misses the limit; over the accuracy budget, it is not kept."""
    spec, config, before, statistics, candidate, data = _conv_softmax()
    base = _quantize_nodes(candidate)

    def clock(model: ir.Model) -> float:  # the Conv fuses only with its output quantized
        return 1.5 if _quantize_nodes(model) <= base else 0.8

    result, chosen = speed.search(
        spec,
        config,
        before,
        statistics,
        candidate,
        clock,
        1.5,
        1.0,
        score=lambda m: accuracy,
        recalibrate=lambda alternative: spec.collect(before, data, alternative),
    )
    # the recipe's placement is tried first (its Conv back to float: no faster), then the fusing one
    first = next(t for t in result.tried if t["trial"] == "islands=False, outliers=0.0")
    assert first["layers"] is None and result.tried.index(first) > 0
    if accuracy <= 1.0:
        assert result.passed and first["kept"] and chosen is not None and not chosen[0].islands
        assert result.changed == {"islands": False, "outliers": 0.0} and not result.float_nodes
        assert "islands=False" in speed.summary(result.to_dict())
    else:
        assert not first["kept"] and "over the accuracy budget" in speed.summary(result.to_dict())


def test_an_output_without_lossy_changes_is_reported_not_judged() -> None:
    """fold alone has nothing to trade for speed: timing noise must not fail the run (exit 1)."""
    recipe = {"passes": ["fold"], "verify": {"samples": 4, "latency_runs": 3}, "budget": {"max_latency_ratio": 0.01}}
    result = optimize(DIGITS, recipe)  # would raise AccuracyBudgetError if judged
    assert result.report.speed is not None and not result.report.speed["passed"]


def test_passes_named_on_the_command_line_get_no_latency_budget_unless_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--pass fp16 on a CPU is what the user asked for: timed and warned about, not dropped."""
    report = tmp_path / "r.json"
    code = cli.main(
        ["optimize", str(DIGITS), "-o", str(tmp_path / "o.onnx"), "--pass", "fp16", "--report", str(report)]
    )
    assert code == 0, capsys.readouterr().err
    data = json.loads(report.read_text())
    assert data["speed"] is None and data["passes"][0]["modified"]


def test_a_rerun_takes_the_later_steps_snapshots_again() -> None:
    """The accuracy fallback re-runs an earlier step; the latency search then builds later steps on its output."""
    from graphopt import recipe as recipes
    from graphopt.pipeline import Pipeline

    model = optimize(DIGITS, {"passes": ["fold"], "verify": {"enabled": False}}).model
    pipeline = Pipeline(recipes.parse_passes(["prune:sparsity=0.5", "quantize"]), keep_snapshots=True)
    pipeline.run(model, calibration=_calib())
    quantize, prune = pipeline.lossy_snapshots()
    spec = prune.spec
    everything = [n.name for n in prune.before.graph if n.op_type in ("Conv", "Gemm")]
    pipeline.rerun(prune, spec.with_excluded(prune.step.config, everything), prune.statistics, _calib())
    fresh = pipeline.lossy_snapshots()[0]
    assert fresh is not quantize and fresh.index == quantize.index
    output = pipeline.skip(fresh, "test", _calib())
    zeros = sum(int(np.sum(v.const_value.numpy() == 0)) for v in output.graph.initializers.values() if v.const_value)
    assert zeros < 100  # the dense weights of the re-run prune, not the first run's 50% zeros


def test_graphopt_sessions_do_not_spin_unless_asked(tmp_path: Path) -> None:
    """Calibration, verification and timing take turns with numpy's BLAS threads and with each other: an idle ORT
    thread that spin-waits steals their core (calibration ran 2x slower between the Hessians' products)."""
    from tests import toy

    path = toy.save(toy.foldable(), tmp_path / "m.onnx")
    quiet = runtime.create_session(path, threads=2)
    assert quiet.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = runtime.create_session(path, threads=2, spinning=True).get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):  # left to ORT's default: spin
        spinning.get_session_config_entry("session.intra_op.allow_spinning")


def test_over_both_budgets_a_step_int8_cannot_pay_for_goes_before_any_accuracy_search() -> None:
    """No placement meets the latency limit: quantize goes at once, and no accuracy search is spent on placements the
    latency budget would drop anyway (on a real text detector that search took its whole 300 s time limit)."""
    plan = {**_recipe(0.01), "budget": {"max_rel_l2": 1e-6, "max_latency_ratio": 0.01}, "fallback": {"drop": True}}
    result = optimize(DIGITS, plan, calibration=_calib())
    assert result.report.fallback is None  # the accuracy search never ran
    assert result.report.speed is not None and result.report.speed["dropped"]
    assert "latency budget" in result.report.passes[1].details["skipped"]
    assert result.report.verification is not None and result.report.verification.passed


def test_over_both_budgets_the_accuracy_search_starts_from_the_placement_that_pays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The latency budget puts the layer class whose int8 form costs back to float first; the accuracy fallback then
    searches only among the layers worth keeping in int8, and the report keeps the latency search's record."""
    from graphopt import verify

    # A stand-in for the clock: int8 spatial convolutions cost, the other int8 layers do not.
    monkeypatch.setattr(
        verify.Checker, "latency_ratios", lambda self, ms, runs=20: [0.6 + 0.2 * _int8_spatial_convs(m) for m in ms]
    )
    before = optimize(DIGITS, {"passes": ["fold"], "verify": {"enabled": False}}).model
    convs = speed.classes(before, registry.REGISTRY["quantize"], QuantizeConfig())["spatial convolutions"]
    plan = {**_recipe(1.0), "budget": {"max_rel_l2": 1e-6, "max_latency_ratio": 1.0}, "fallback": {"drop": True}}
    plan["verify"] = {**plan["verify"], "latency_runs": 0}
    result = optimize(DIGITS, plan, calibration=_calib())
    found = result.report.speed
    assert found is not None and found["passed"]
    assert [t["trial"] for t in found["tried"] if t["kept"]] == ["in float: spatial convolutions"]
    searched = result.report.fallback
    assert searched is not None and searched["sensitivity"]  # the accuracy search ran after it
    assert not set(searched["sensitivity"]) & set(convs)  # among the layers still int8 only


def test_a_placement_slower_than_the_model_without_the_step_does_not_pay() -> None:
    """Within the budget against the input is not enough: the exact model without the step runs faster still."""
    spec, config, before, statistics, candidate = _quantized_digits()
    clock = lambda m: 0.6 + 0.2 * _int8_spatial_convs(m)  # noqa: E731
    kept, chosen = speed.search(spec, config, before, statistics, candidate, clock, 1.6, 1.0, without=0.7)
    assert chosen is not None and kept.passed  # 0.6x beats both the budget and the model without quantize
    dropped, chosen = speed.search(spec, config, before, statistics, candidate, clock, 1.6, 1.0, without=0.5)
    assert chosen is None and dropped.dropped and "faster than the model without it (0.50×" in dropped.reason
    assert "faster than the model without quantize (0.50×)" in speed.summary(dropped.to_dict())


def test_int8_within_the_budget_but_slower_than_without_it_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default job's promise is a faster model: quantize at 0.95x the input, where the folded model without it runs
    at 0.90x, costs accuracy for a slower output, so it goes and the report says why."""
    from graphopt import verify

    def clock(self: object, models: list[ir.Model], runs: int = 20) -> list[float]:
        return [0.95 if _quantize_nodes(model) else 0.90 for model in models]

    monkeypatch.setattr(verify.Checker, "latency_ratios", clock)
    plan = _recipe(1.0)
    plan["verify"] = {**plan["verify"], "latency_runs": 0}
    result = optimize(DIGITS, plan, calibration=_calib())
    found = result.report.speed
    assert found is not None and found["dropped"] and found["without"] == 0.90
    assert not result.report.passes[1].modified and "without it" in result.report.passes[1].details["skipped"]
    assert not _quantize_nodes(result.model)


def test_the_output_and_the_model_without_the_step_are_timed_in_one_series(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compared with each other, the two are measured under the same conditions, and the input runs once for both."""
    from graphopt import verify

    calls: list[list[str]] = []
    real = runtime.interleaved_latency

    def spy(sessions: dict[str, object], feeds: dict[str, np.ndarray], **kwargs: object) -> dict:
        calls.append(list(sessions))
        return real(sessions, feeds, **kwargs)

    monkeypatch.setattr(runtime, "interleaved_latency", spy)
    *_, before, _statistics, candidate = _quantized_digits()
    checker = verify.Checker(before, _calib(), verify.Budget(), "cpu", 1)
    ratios = checker.latency_ratios([candidate, before], 5)
    assert calls == [["reference", "candidate 0", "candidate 1"]] and len(ratios) == 2
    assert 0.5 < ratios[1] < 2.0  # the input against itself, within noise


def test_a_placement_onnx_runtime_runs_as_no_integer_kernel_does_not_pay(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timing tie (1.00-1.02x) kept Q/DQ that ORT fused into nothing: they only round, so the step goes."""
    from graphopt import ort_view

    spec, config, before, statistics, candidate = _quantized_digits()
    clock = lambda m: 0.6 + 0.2 * _int8_spatial_convs(m)  # noqa: E731
    real = ort_view.inspect_runtime
    kept, chosen = speed.search(spec, config, before, statistics, candidate, clock, 1.6, 1.0)
    assert chosen is not None and kept.passed  # ORT fuses the int8 layers left

    def fused_nothing(model: ir.Model, device: str = "cpu", **kwargs: object) -> ort_view.RuntimeView:
        view = real(model, device, **kwargs)
        view.integer_kernels = 0
        return view

    monkeypatch.setattr(ort_view, "inspect_runtime", fused_nothing)
    dropped, chosen = speed.search(spec, config, before, statistics, candidate, clock, 1.6, 1.0)
    assert chosen is None and dropped.dropped and "none of the layers quantize left" in dropped.reason


def test_an_idle_placement_gives_way_to_the_fusing_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe's placement times within the limit but ORT fuses none of it: the fusing placement is tried before
    the step is dropped (here ORT fuses none of that either)."""
    from graphopt import ort_view

    spec, config, before, statistics, candidate = _quantized_digits()
    real = ort_view.inspect_runtime

    def fused_nothing(model: ir.Model, device: str = "cpu", **kwargs: object) -> ort_view.RuntimeView:
        found = real(model, device, **kwargs)
        found.integer_kernels = 0
        return found

    monkeypatch.setattr(ort_view, "inspect_runtime", fused_nothing)
    clock = lambda m: 0.6 + 0.2 * _int8_spatial_convs(m)  # noqa: E731
    searched = (spec, config, before, statistics, candidate, clock, 1.6, 1.0)
    recalibrate = lambda a: spec.collect(before, _calib(), a)  # noqa: E731
    result, chosen = speed.search(*searched, score=lambda m: 0.5, recalibrate=recalibrate)
    assert any(t["trial"].startswith("islands=False") for t in result.tried)  # tried, though the first placement met
    assert chosen is None and result.dropped and "integer kernel" in result.reason
