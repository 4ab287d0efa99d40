"""No silent success: a run that compressed nothing, came out slower, or checked nothing says so."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from graphopt import budget, cli, render
from graphopt.report import Report
from graphopt.runtime import Latency
from graphopt.stats import ModelStats
from graphopt.verify import OutputMetrics, VerifyResult

DATA = Path(__file__).resolve().parents[1] / "graphopt" / "data"


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def test_a_lossy_pass_that_changed_nothing_says_so_and_why(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Dynamic mode (no --calib) on a CNN quantizes nothing: the run says so and names the fix."""
    code, text = _run(
        capsys, "optimize", str(DATA / "digits_cnn.onnx"), "-o", str(tmp_path / "o.onnx"), "--pass", "quantize"
    )
    assert code == 0
    assert "warning: nothing was compressed" in text and "--calib" in text


def test_the_report_files_carry_the_warnings_and_say_not_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pipeline that reads only the report files sees what the console said."""
    args = ["optimize", str(DATA / "digits_cnn.onnx"), "-o", str(tmp_path / "o.onnx"), "--pass", "quantize"]
    args += ["--report", str(tmp_path / "r.json"), "--report-md", str(tmp_path / "r.md")]
    assert cli.main(args) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert any(w.startswith("nothing was compressed") for w in data["warnings"])
    markdown = (tmp_path / "r.md").read_text()
    assert (
        "- nothing was compressed" in markdown
        and "PASSED (budget: min cosine >= 0.9; decisions standing >= 0.98)" in markdown
    )
    (tmp_path / "none.yaml").write_text("passes: [fold]\n")  # no budget: nothing is judged
    args = ["optimize", str(DATA / "digits_cnn.onnx"), "-o", str(tmp_path / "f.onnx"), "--recipe"]
    assert cli.main([*args, str(tmp_path / "none.yaml"), "--report-md", str(tmp_path / "f.md")]) == 0
    assert "NOT CHECKED (no budget)" in (tmp_path / "f.md").read_text()


def test_verify_without_limits_judges_by_the_default_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(DATA / "digits_cnn.onnx")
    code, text = _run(capsys, "verify", model, model)
    assert code == 0 and "PASSED (budget: min cosine >= 0.9; decisions standing >= 0.98)" in text


def test_metrics_without_a_budget_are_not_called_passed(capsys: pytest.CaptureFixture[str]) -> None:
    result = VerifyResult("cpu", 4, [OutputMetrics("y", cosine_min=0.59)])
    assert result.passed and result.budget == ""  # nothing was checked
    console = render.Console(record=True, width=200)
    render.render_verification(console, result)
    text = console.export_text()
    assert "NOT CHECKED" in text and "PASSED" not in text


def test_budget_describe_lists_every_limit() -> None:
    text = budget.describe(budget.Budget(max_rel_l2=0.1, min_cosine=0.99, outputs=("y",)))
    assert text == "relative L2 <= 0.1; min cosine >= 0.99 on y"
    assert budget.describe(budget.Budget()) == ""


def _report(**kwargs: object) -> Report:
    stats = ModelStats(nodes=3, parameters=10, bytes=40)
    fields: dict[str, object] = {"passes": [], **kwargs}
    return Report(input_path=None, device="cpu", before=stats, after=stats, **fields)  # type: ignore[arg-type]


def test_report_json_is_standard_json_with_infinite_scores() -> None:
    report = _report(fallback={"score_before": math.inf, "score_after": math.nan, "passed": False})
    text = report.to_json()
    data = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert data["fallback"]["score_before"] == "inf" and data["fallback"]["score_after"] == "nan"


def test_a_slower_output_is_reported() -> None:
    from graphopt.report import PassRecord

    stats = ModelStats(nodes=3, parameters=10, bytes=40)
    changed = PassRecord("fold", {}, 0.1, True, True, stats, stats)
    slow = {"reference": Latency(1.0, 1.1, 0.9, 20), "optimized": Latency(1.5, 1.6, 1.4, 20)}
    warnings = render.outcome_warnings(_report(latency=slow, passes=[changed]))
    assert any("1.50× slower" in w for w in warnings)
    same = {"reference": Latency(1.0, 1.1, 0.9, 20), "optimized": Latency(1.02, 1.1, 0.9, 20)}
    assert render.outcome_warnings(_report(latency=same, passes=[changed])) == []


def test_compressing_little_is_reported_with_the_reason() -> None:
    from graphopt.report import PassRecord

    before, after = ModelStats(nodes=3, parameters=10, bytes=1000), ModelStats(nodes=3, parameters=10, bytes=990)
    dynamic = PassRecord("quantize", {}, 0.1, True, False, before, after, details={"mode": "dynamic"})
    report = _report(passes=[dynamic])
    report.before, report.after = before, after
    (warning,) = render.outcome_warnings(report)
    assert "little was compressed" in warning and "--calib" in warning
    pruned = ModelStats(nodes=3, parameters=10, bytes=1000, sparsity=0.5)  # 2:4 stored dense: zeros, same bytes
    prune = PassRecord("prune", {}, 0.1, True, False, before, pruned)
    report = _report(passes=[prune])
    report.before, report.after = before, pruned
    assert render.outcome_warnings(report) == []


def test_verification_holds_out_samples_calibration_did_not_use(tmp_path: Path) -> None:
    import numpy as np

    import graphopt

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input=rng.normal(size=(40, 1, 8, 8)).astype(np.float32))
    recipe = {"passes": ["fold", "quantize"], "verify": {"samples": 8, "latency_runs": 0}}
    calibration = graphopt.DataSpec(source=str(tmp_path / "calib.npz"), samples=24)
    report = graphopt.optimize(str(DATA / "digits_cnn.onnx"), recipe, calibration=calibration).report
    assert report.data is not None and "samples 24 to 31" in report.data["verification"]
    assert "samples 0 to 23" in report.data["calibration"] and "note" not in report.data
    # No sample left over: verification reuses the calibration samples, and the report says so.
    calibration = graphopt.DataSpec(source=str(tmp_path / "calib.npz"), samples=40)
    report = graphopt.optimize(str(DATA / "digits_cnn.onnx"), recipe, calibration=calibration).report
    assert "samples 0 to 7" in report.data["verification"] and "reused calibration samples" in report.data["note"]
