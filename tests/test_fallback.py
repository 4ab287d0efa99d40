from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest

import graphopt
from graphopt import verify
from graphopt.calibration.sources import DataSpec
from graphopt.errors import AccuracyBudgetError
from graphopt.fallback import budget_score

DATA = Path(str(resources.files("graphopt") / "data"))


def _result(**metrics: float) -> verify.VerifyResult:
    return verify.VerifyResult("cpu", 1, [verify.OutputMetrics("y", **metrics)])


def test_budget_score_is_one_at_the_limit() -> None:
    budget = verify.Budget(max_rel_l2=0.1, min_cosine=0.99)
    assert budget_score(_result(rel_l2=0.1, cosine_min=0.995), budget) == pytest.approx(1.0)
    assert budget_score(_result(rel_l2=0.05, cosine_min=0.98), budget) == pytest.approx(2.0)
    assert budget_score(_result(rel_l2=0.0, cosine_min=1.0), budget) == 0.0


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
    assert set(fallback["float_nodes"]) <= set(quantize.options["exclude_nodes"])


def test_unreachable_budget_reports_the_search_and_fails() -> None:
    recipe = _cnn_recipe({"max_abs": 0.0}, max_float_nodes=2, max_candidates=3)
    with pytest.raises(AccuracyBudgetError, match="fallback found no set of float layers") as info:
        graphopt.optimize(DATA / "digits_cnn.onnx", recipe, calibration=_calibration())
    assert info.value.report.fallback["trials"] >= 3 and not info.value.report.fallback["passed"]
