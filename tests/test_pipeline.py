from __future__ import annotations

from io import StringIO
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from rich.console import Console

import graphopt
from graphopt import io, registry, render
from graphopt.errors import AccuracyBudgetError, DataError, PassError
from graphopt.passes.fold import FoldConfig, FoldConstantsPass
from graphopt.report import outcome_warnings
from tests import toy
from tests.conftest import NoisePasses


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return toy.save(toy.foldable(), tmp_path / "model.onnx")


def test_optimize_path_records_every_pass(model_path: Path) -> None:
    result = graphopt.optimize(model_path, ["fold", "fold"])
    first, second = result.report.passes
    assert first.modified and not second.modified
    assert (first.before.nodes, first.after.nodes) == (6, 3)
    assert first.seconds > 0
    assert result.report.verification is not None and result.report.verification.passed
    assert result.report.latency is not None and set(result.report.latency) == {"reference", "optimized"}


def test_optimize_leaves_the_given_model_unchanged(model_path: Path) -> None:
    model = io.load_model(model_path)
    result = graphopt.optimize(model, ["fold"])
    assert len(list(model.graph)) == 6 and len(list(result.model.graph)) == 3


def test_budget_failure_names_the_lossy_pass(model_path: Path, noise_passes: NoisePasses) -> None:
    plan = {"passes": ["fold", "noise"], "budget": {"max_rel_l2": 1e-3}}
    with pytest.raises(AccuracyBudgetError) as info:
        graphopt.optimize(model_path, plan, known=noise_passes.known)
    message = str(info.value)
    assert "output 'y': relative L2" in message and "Passes that changed the model: noise" in message
    assert info.value.report is not None and not info.value.report.verification.passed
    assert info.value.exit_code == 1
    assert info.value.report.fallback is not None  # a failed search does not read as "nodes left in float: none"
    markdown = info.value.report.to_markdown()
    assert "within its limits held it" in markdown and "nodes left in float: none" not in markdown


def test_fallback_drop_writes_the_model_without_the_step_it_could_not_hold(
    model_path: Path, noise_passes: NoisePasses
) -> None:
    """The default job's ``fallback.drop``: no placement meets the budget, so the lossy step goes, the output is the
    exact passes' and the report says why; without it the same run fails (exit 1, the test above)."""
    plan = {
        "passes": ["fold", "noise"],
        "budget": {"max_rel_l2": 1e-3},
        "fallback": {"drop": True},
        "verify": {"latency_runs": 0},
    }
    result = graphopt.optimize(model_path, plan, known=noise_passes.known)
    assert result.report.verification is not None and result.report.verification.passed
    fold, noise = result.report.passes
    assert fold.modified and not noise.modified
    assert noise.details["skipped"].startswith("dropped by the accuracy budget")
    assert "relative L2" in noise.details["skipped"]
    assert any("nothing was compressed" in w for w in outcome_warnings(result.report))
    # the fallback's line says the step went, not "nodes left in float: none"
    assert result.report.fallback is not None and result.report.fallback["dropped"] == ["noise"]
    markdown = result.report.to_markdown()
    assert "no placement held the budget" in markdown and "dropped: noise." in markdown
    assert "nodes left" not in markdown and "reached" not in markdown
    console = Console(file=StringIO(), width=300)
    render.render_report(console, result.report)
    assert "no placement held the budget after" in console.file.getvalue()
    folded = graphopt.optimize(model_path, {"passes": ["fold"], "verify": {"latency_runs": 0}}).model
    assert [n.op_type for n in result.model.graph] == [n.op_type for n in folded.graph]


def test_fallback_enabled_false_is_obeyed_under_a_latency_budget(model_path: Path, noise_passes: NoisePasses) -> None:
    """A latency budget keeps the lossy step's snapshot; that must not start the accuracy search the recipe turned
    off."""
    plan = {
        "passes": ["noise"],
        "budget": {"max_rel_l2": 1e-3, "max_latency_ratio": 100},
        "fallback": {"enabled": False},
        "verify": {"latency_runs": 0},
    }
    with pytest.raises(AccuracyBudgetError) as info:
        graphopt.optimize(model_path, plan, known=noise_passes.known)
    assert info.value.report is not None and info.value.report.fallback is None


def test_report_only_does_not_raise(model_path: Path, noise_passes: NoisePasses) -> None:
    plan = {"passes": ["noise"], "budget": {"max_rel_l2": 1e-3}, "verify": {"report_only": True, "latency_runs": 0}}
    result = graphopt.optimize(model_path, plan, known=noise_passes.known)
    assert not result.report.verification.passed and result.report.latency is None


def test_calibration_reaches_the_pass(model_path: Path, tmp_path: Path, noise_passes: NoisePasses) -> None:
    with pytest.raises(DataError, match="pass 'calibrated_noise' needs calibration data"):
        graphopt.optimize(model_path, ["calibrated_noise"], known=noise_passes.known)
    np.savez(tmp_path / "calib.npz", x=np.zeros((4, 8), np.float32))
    plan = {"passes": ["calibrated_noise"], "verify": {"report_only": True, "latency_runs": 0}}
    graphopt.optimize(model_path, plan, calibration=tmp_path / "calib.npz", known=noise_passes.known)
    assert noise_passes.seen == [tmp_path / "calib.npz"]


def test_failing_pass_is_named_with_those_before(model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: FoldConstantsPass, model: ir.Model) -> ir.passes.PassResult:
        raise RuntimeError("kaput")

    graphopt.optimize(model_path, ["fold"])  # a healthy first run
    monkeypatch.setattr(FoldConstantsPass, "call", boom)
    with pytest.raises(PassError, match=r"pass 1 'fold' failed: RuntimeError: kaput"):
        graphopt.optimize(model_path, ["fold"])


def test_check_blames_the_pass_that_broke_the_graph(model_path: Path, noise_passes: NoisePasses) -> None:
    class Breaks(FoldConstantsPass):
        def call(self, model: ir.Model) -> ir.passes.PassResult:
            next(iter(model.graph)).op_type = "NoSuchOp"
            return ir.passes.PassResult(model, modified=True)

    known = noise_passes.known.with_passes(registry.PassSpec("breaks", Breaks, FoldConfig))
    with pytest.raises(PassError, match=r"pass 2 'breaks' \(after noise\) left a model that fails onnx.checker"):
        graphopt.optimize(model_path, {"passes": ["noise", "breaks"], "check": True}, known=known)


def test_weights_stored_as_constant_nodes_are_weights(tmp_path: Path) -> None:
    """Paddle-style exports hold every weight in a Constant node: a lossy pass must still find them."""
    proto = toy.relu_mlp()
    for init in list(proto.graph.initializer):
        proto.graph.node.insert(0, onnx.helper.make_node("Constant", [], [init.name], value=init))
    del proto.graph.initializer[:]
    path = toy.save(proto, tmp_path / "constants.onnx")
    result = graphopt.optimize(path, {"passes": ["prune:pattern=n:m"], "verify": {"report_only": True}})
    assert result.report.passes[0].modified and result.report.lifted_constants >= 2
    assert "became initializers" in result.report.to_markdown()
    exact = graphopt.optimize(path, ["fold"])  # exact pipelines leave the file's form to fold
    assert exact.report.lifted_constants == 0


def test_progress_covers_the_steps_after_the_passes() -> None:
    data = Path(__file__).resolve().parents[1] / "graphopt" / "data"
    seen: list[tuple[int, int, str]] = []
    recipe = {
        "passes": ["fold", "quantize"],
        "verify": {"samples": 8, "latency_runs": 3},
        "budget": {"min_cosine": 0.9, "max_latency_ratio": 100.0},
    }
    calibration = graphopt.DataSpec(source=str(data / "digits_calib.npz"), samples=16)
    model = str(data / "digits_cnn.onnx")
    graphopt.optimize(model, recipe, calibration=calibration, progress=lambda *a: seen.append(a))
    names = [name for _, _, name in seen]
    assert names[:2] == ["fold", "quantize"]
    after = [name for done, total, name in seen if done == total]
    assert after[1:] == [
        "verifying against the input",
        "latency budget: timing against the input",
        "layer-wise comparison",
        "timing the output against the input",
    ]
