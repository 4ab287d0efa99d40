from __future__ import annotations

import dataclasses
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import verify
from graphopt.calibration.sources import DataSpec
from graphopt.errors import AccuracyBudgetError
from tests import toy

DATA = Path(str(resources.files("graphopt") / "data"))


def _result(**metrics: float) -> verify.VerifyResult:
    return verify.VerifyResult("cpu", 1, [verify.OutputMetrics("y", **metrics)])


def test_budget_score_is_one_at_the_limit() -> None:
    budget = verify.Budget(max_rel_l2=0.1, min_cosine=0.99)
    assert _result(rel_l2=0.1, cosine_min=0.995).score(budget) == pytest.approx(1.0)
    assert _result(rel_l2=0.05, cosine_min=0.98).score(budget) == pytest.approx(2.0)
    assert _result(rel_l2=0.0, cosine_min=1.0).score(budget) == 0.0


def test_score_and_violations_read_the_same_limits() -> None:
    """Every limit that scores over 1 is reported as a violation, and only those."""
    budget = verify.Budget(max_abs=0.1, max_rel_l2=0.1, min_cosine=0.99, min_cosine_mean=0.995, min_top1=0.9)
    within = verify.OutputMetrics("y", max_abs=0.1, rel_l2=0.05, cosine_min=0.99, cosine_mean=0.999, top1=0.95)
    assert graphopt.budget.violations(within, budget) == [] and graphopt.budget.score([within], budget) <= 1.0
    for name, value in (("max_abs", 0.2), ("rel_l2", 0.2), ("cosine_min", 0.98), ("cosine_mean", 0.99), ("top1", 0.8)):
        over = dataclasses.replace(within, **{name: value})
        assert len(graphopt.budget.violations(over, budget)) == 1, name
        assert graphopt.budget.score([over], budget) > 1.0, name
    nan = dataclasses.replace(within, rel_l2=float("nan"))
    assert graphopt.budget.violations(nan, budget) and graphopt.budget.score([nan], budget) == float("inf")


def _cnn_recipe(budget: dict[str, float], **fallback: int) -> dict[str, object]:
    return {
        "passes": ["fold", "quantize:method=minmax", "fold"],
        "verify": {"data": str(DATA / "digits_test.npz"), "samples": 64, "batch_size": 64, "latency_runs": 0},
        "budget": budget,
        "fallback": fallback,
    }


def _calibration() -> DataSpec:
    return DataSpec(source=str(DATA / "digits_calib.npz"), samples=64, batch_size=32)


def test_fallback_keeps_the_fewest_layers_in_float_to_meet_the_budget() -> None:
    plain = graphopt.optimize(DATA / "digits_cnn.onnx", _cnn_recipe({}), calibration=_calibration())
    cosine = plain.report.verification.outputs[0].cosine_min
    target = 1.0 - (1.0 - cosine) / 3  # three times closer to fp32 than all-int8 is
    result = graphopt.optimize(
        DATA / "digits_cnn.onnx", _cnn_recipe({"min_cosine": target}), calibration=_calibration()
    )
    fallback = result.report.fallback
    assert fallback is not None and fallback["passed"] and 1 <= len(fallback["float_nodes"]) < 7
    assert result.report.verification.passed
    quantize = next(p for p in result.report.passes if p.name == "quantize")
    assert set(fallback["float_nodes"]) <= set(quantize.options["exclude"])


def test_unreachable_budget_reports_the_search_and_fails() -> None:
    recipe = _cnn_recipe({"max_abs": 0.0}, max_float_nodes=2, max_candidates=3)
    with pytest.raises(AccuracyBudgetError, match="fallback found no set of float layers") as info:
        graphopt.optimize(DATA / "digits_cnn.onnx", recipe, calibration=_calibration())
    fallback = info.value.report.fallback
    assert fallback["trials"] >= 3 and not fallback["passed"]
    # re-calibrations were tried, but nothing was applied, and the report does not say otherwise
    assert set(fallback["alternatives"]) == {"method=percentile", "method=mse"} and fallback["changed"] == {}


def test_the_fastest_of_equally_small_solutions_wins(tmp_path: Path) -> None:
    """Two single layers meet the budget: the faster one is kept in float, not the first found."""
    from graphopt import io
    from graphopt.fallback import FallbackResult, _Search
    from graphopt.passes.quantize import QuantizeConfig
    from tests import toy

    class Tagging(ir.passes.InPlacePass):  # a stand-in lossy pass: records what it was told to leave in float
        def __init__(self, config: QuantizeConfig, statistics: object = None) -> None:
            super().__init__()
            self.config = config

        def call(self, model: ir.Model) -> ir.passes.PassResult:
            model.doc_string = ",".join(self.config.exclude)
            return ir.passes.PassResult(model, modified=True)

    scores = {"big": 0.9, "small": 0.95, "bad": 1.2, "big,small": 0.5}
    speed = {"big": 5.0, "small": 3.0, "bad": 1.0, "big,small": 6.0}
    before = io.load_model(toy.save(toy.foldable(), tmp_path / "m.onnx"))
    search = _Search(
        graphopt.registry.PassSpec("tagging", Tagging, QuantizeConfig, lossy=graphopt.registry.Lossy()),
        QuantizeConfig(),
        before,
        None,
        lambda m: scores[m.doc_string],
        FallbackResult("quantize"),
    )
    for excluded in (["big"], ["bad"], ["small"], ["big", "small"]):
        search.score(excluded)
    timed: list[list[str]] = []

    def latency(models: list[object]) -> list[float]:
        timed.append([m.doc_string for m in models])
        return [speed[m.doc_string] for m in models]

    assert search.fastest(["big"], latency, limit=6) == ["small"]
    assert timed == [["big", "small"]]  # over-budget and larger sets are not timed
    assert search.result.timed == {"big": 5.0, "small": 3.0}
    assert search.fastest(["big"], None, limit=6) == ["big"]


class _Tagging(ir.passes.InPlacePass):
    """A stand-in lossy pass: records in the model what it was told to leave in float."""

    def __init__(self, config: object, statistics: object = None) -> None:
        super().__init__()
        self.config = config

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.doc_string = ",".join(self.config.exclude)  # type: ignore[attr-defined]
        return ir.passes.PassResult(model, modified=True)


def test_past_its_time_limit_the_search_takes_the_smallest_set_found(tmp_path: Path) -> None:
    from graphopt import fallback, io
    from graphopt.passes.quantize import QuantizeConfig

    scores = {"a": 1.5, "b": 0.9, "c,d": 0.4}
    spec = graphopt.registry.PassSpec("tagging", _Tagging, QuantizeConfig, lossy=graphopt.registry.Lossy())
    before = io.load_model(toy.save(toy.foldable(), tmp_path / "m.onnx"))
    state = fallback._Search(
        spec, QuantizeConfig(), before, None, lambda m: scores[m.doc_string], fallback.FallbackResult("quantize")
    )
    for excluded in (["a"], ["b"], ["c", "d"]):
        state.score(excluded)
    state.deadline = 0.0  # long past
    assert state.score(["b"]) == 0.9  # a set already tried costs nothing
    with pytest.raises(fallback._OutOfTime):
        state.score(["a", "b"])
    assert state.best_so_far() == ["b"]


def test_a_search_out_of_time_says_so(tmp_path: Path) -> None:
    from graphopt import fallback, io
    from graphopt.passes.quantize import QuantizeConfig

    spec = graphopt.registry.PassSpec("tagging", _Tagging, QuantizeConfig, lossy=graphopt.registry.Lossy())
    before = io.load_model(toy.save(toy.relu_mlp(), tmp_path / "m.onnx"))
    settings = graphopt.recipe.FallbackSettings(max_seconds=0)
    result, _, _ = fallback.search(spec, QuantizeConfig(), before, None, lambda m: 2.0, 2.0, settings)
    assert not result.passed and result.trials == 0
    assert "time limit of 0 s (fallback.max_seconds)" in result.stopped


def test_better_calibration_is_tried_before_any_float_layer() -> None:
    def run(method: str, budget: dict[str, float]) -> graphopt.pipeline.Result:
        recipe = _cnn_recipe(budget)
        # round-to-nearest: GPTQ's rounding moves these cosines more than the range method does
        recipe["passes"] = ["fold", f"quantize:method={method},rounding=nearest", "fold"]
        return graphopt.optimize(DATA / "digits_cnn.onnx", recipe, calibration=_calibration())

    minmax = run("minmax", {}).report.verification.outputs[0].cosine_min
    percentile = run("percentile", {}).report.verification.outputs[0].cosine_min
    assert percentile > minmax  # the bundled CNN's minmax ranges are wider than they need to be
    result = run("minmax", {"min_cosine": (minmax + percentile) / 2})
    fallback = result.report.fallback
    assert fallback["passed"] and fallback["float_nodes"] == [] and fallback["changed"] == {"method": "percentile"}
    assert fallback["trials"] == 2  # percentile and mse, re-calibrated; no layer search
    quantize = next(p for p in result.report.passes if p.name == "quantize")
    assert quantize.options["method"] == "percentile"


def test_pruning_falls_back_to_a_better_method_then_dense_layers() -> None:
    """50% unstructured on the bundled CNN: SparseGPT first (same sparsity), then the fewest dense layers."""

    def run(method: str, budget: dict[str, float]) -> graphopt.pipeline.Result:
        recipe = _cnn_recipe(budget)
        recipe["passes"] = [f"prune:sparsity=0.5,method={method}"]
        return graphopt.optimize(DATA / "digits_cnn.onnx", recipe, calibration=_calibration())

    sparsegpt = run("sparsegpt", {}).report.verification.outputs[0].cosine_min
    result = run("magnitude", {"min_cosine": 1.0 - (1.0 - sparsegpt) / 4})
    fallback = result.report.fallback
    assert fallback["pass_name"] == "prune" and fallback["passed"]
    # the report says what happened in pruning's own terms
    assert fallback["kept"] == "dense" and "nodes left dense:" in result.report.to_markdown()
    assert fallback["changed"] == {"method": "sparsegpt"} and 1 <= len(fallback["float_nodes"]) <= 3
    prune = result.report.passes[0]
    assert prune.options["method"] == "sparsegpt" and set(prune.options["exclude"]) == set(fallback["float_nodes"])
    assert result.report.verification.passed


def test_exclusions_go_where_each_pass_reads_them() -> None:
    from graphopt.passes.fp16 import Fp16Config
    from graphopt.passes.prune.unstructured import PruneConfig
    from graphopt.passes.quantize import QuantizeConfig

    spec = graphopt.registry.get_spec
    quantize = spec("quantize").with_excluded(QuantizeConfig(), ["fc", "tensor:h"])
    assert quantize.exclude == ("fc",) and quantize.exclude_tensors == ("h",)
    # every exclude list holds shell patterns: a node name with pattern characters must match only itself
    prune = spec("prune").with_excluded(PruneConfig(exclude=("head*",)), ["layers[0].fc"])
    assert prune.exclude == ("head*", "layers[[]0].fc")
    assert spec("fp16").with_excluded(Fp16Config(), ["softmax_in"]).exclude == ("softmax_in",)
    # a pass without exclude_tensors never receives tensor entries
    assert spec("fp16").with_excluded(Fp16Config(), ["tensor:h"]).exclude == ()


def test_structured_pruning_keeps_the_fewest_producers_whole() -> None:
    recipe = _cnn_recipe({})
    recipe["passes"] = ["prune_structured:ratio=0.5,recover=false"]
    plain = graphopt.optimize(DATA / "digits_cnn.onnx", recipe, calibration=_calibration())
    cosine = plain.report.verification.outputs[0].cosine_min
    recipe["budget"] = {"min_cosine": 1.0 - (1.0 - cosine) / 3}
    result = graphopt.optimize(DATA / "digits_cnn.onnx", recipe, calibration=_calibration())
    fallback = result.report.fallback
    assert fallback["pass_name"] == "prune_structured" and fallback["passed"] and fallback["float_nodes"]
    assert set(result.report.passes[0].options["exclude"]) == set(fallback["float_nodes"])


def test_an_alternative_that_compresses_less_is_not_taken(tmp_path: Path) -> None:
    """Wanda/SparseGPT leave grouped Convs dense: not the same sparsity, so not an alternative."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "dw"], ["a"], name="dwconv", group=16, pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["a"], ["b"], name="relu"),
            helper.make_node("Conv", ["b", "pw"], ["y"], name="pwconv"),
        ],
        "grouped",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, 8, 8])],
        [
            numpy_helper.from_array(rng.standard_normal((16, 1, 3, 3)).astype(np.float32), "dw"),
            numpy_helper.from_array((rng.standard_normal((16, 16, 1, 1)) / 4).astype(np.float32), "pw"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "grouped.onnx")
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((64, 16, 8, 8)).astype(np.float32))

    def run(budget: dict[str, float]) -> graphopt.pipeline.Result:
        recipe = {
            "passes": ["prune:sparsity=0.5"],
            "verify": {"data": str(tmp_path / "x.npz"), "samples": 64, "batch_size": 32, "latency_runs": 0},
            "budget": budget,
        }
        return graphopt.optimize(
            tmp_path / "grouped.onnx", recipe, calibration=DataSpec(source=str(tmp_path / "x.npz"))
        )

    cosine = run({}).report.verification.outputs[0].cosine_min
    fallback = run({"min_cosine": 1.0 - (1.0 - cosine) / 3}).report.fallback
    assert fallback["alternatives"] == {} and fallback["changed"] == {}


def test_the_step_that_lost_the_accuracy_is_searched(tmp_path: Path) -> None:
    """weight_only then fp16: fp16 has nothing to keep in float32 after MatMulNBits; weight_only is searched."""
    rng = np.random.default_rng(0)
    toy.save(toy.relu_mlp(64, 64, 32), tmp_path / "mlp.onnx")
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((64, 64)).astype(np.float32))

    def run(budget: dict[str, float]) -> graphopt.pipeline.Result:
        recipe = {
            "passes": ["weight_only:block_size=16", "fp16"],
            "verify": {"data": str(tmp_path / "x.npz"), "samples": 64, "batch_size": 32, "latency_runs": 0},
            "budget": budget,
        }
        return graphopt.optimize(tmp_path / "mlp.onnx", recipe, calibration=DataSpec(source=str(tmp_path / "x.npz")))

    rel_l2 = run({}).report.verification.outputs[0].rel_l2
    result = run({"max_rel_l2": rel_l2 / 3})
    assert result.report.fallback["pass_name"] == "weight_only" and result.report.verification.passed


def test_a_score_that_moves_in_steps_still_finds_its_float_layers(tmp_path: Path) -> None:
    """Decisions flip back only when three layers are float together: no layer alone helps, and the search takes
    the shortest prefix of the candidates (suspects first) that meets the budget."""
    from graphopt import fallback, io
    from graphopt.passes.quantize import QuantizeConfig

    rng = np.random.default_rng(3)
    weights = [rng.standard_normal((8, 8)) for _ in range(6)]
    before = io.load_model(toy.save(toy.matmul_chain(weights), tmp_path / "chain.onnx"))
    spec = graphopt.registry.PassSpec("tagging", _Tagging, QuantizeConfig, lossy=graphopt.registry.Lossy())

    def evaluate(model: ir.Model) -> float:
        floats = set(filter(None, model.doc_string.split(",")))
        return 0.0 if {"fc3", "fc4", "fc5"} <= floats else 3.0  # one flipped sample of 16 against 0.98

    settings = graphopt.recipe.FallbackSettings()
    result, _, _ = fallback.search(
        spec, QuantizeConfig(), before, None, evaluate, 3.0, settings, suspects=["fc5", "fc4", "fc3"]
    )
    assert result.passed and sorted(result.float_nodes) == ["fc3", "fc4", "fc5"]
