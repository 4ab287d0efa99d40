from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from graphopt import cli, registry
from tests import toy
from tests.conftest import NoisePasses


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return toy.save(toy.foldable(), tmp_path / "model.onnx")


def _run(
    capsys: pytest.CaptureFixture[str], *args: str, known: registry.Registry = registry.REGISTRY
) -> tuple[int, str]:
    code = cli.main(list(args), known=known)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_optimize_writes_model_and_reports(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report, md = tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "r.md"
    code, text = _run(
        capsys, "optimize", str(model_path), "-o", str(out), "--report", str(report), "--report-md", str(md)
    )
    assert code == 0, text
    assert out.exists() and "PASSED" in text
    data = json.loads(report.read_text())
    assert data["schema_version"] == 1 and data["passes"][0]["nodes"] == [6, 3]
    assert data["verification"]["passed"] and data["output_bytes_on_disk"] == out.stat().st_size
    assert "| fold |" in md.read_text()


def test_sparse_output_is_reported_as_densified_at_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = toy.save(toy.relu_mlp(64, 64, 32), tmp_path / "mlp.onnx")
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code, text = _run(
        capsys, "optimize", str(model), "-o", str(out), "--pass", "prune:sparsity=0.3", "--sparse", "always",
        "--report", str(report),
    )  # fmt: skip
    assert code == 0, text
    runtime = json.loads(report.read_text())["runtime"]
    assert runtime["sparse_initializers"] == 2 and any("densifies" in w for w in runtime["warnings"])
    assert "densifies" in text


def test_report_dir_has_json_markdown_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from importlib import resources

    data = Path(str(resources.files("graphopt") / "data"))
    args = [
        "optimize",
        str(data / "digits_cnn.onnx"),
        "-o",
        str(tmp_path / "o.onnx"),
        "--calib",
        str(data / "digits_calib.npz"),
    ]
    code, text = _run(capsys, *args, "--report-dir", str(tmp_path / "rep"))
    assert code == 0, text
    names = sorted(p.name for p in (tmp_path / "rep").iterdir())
    assert names == ["latency.png", "layer_errors.png", "report.json", "report.md", "size.png"]
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["runtime"]["integer_kernels"] >= 7 and report["layers"][0]["sqnr_db"] > 10


def test_over_budget_exits_1_and_writes_no_model(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str], noise_passes: NoisePasses
) -> None:
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    args = ("optimize", str(model_path), "-o", str(out), "--pass", "noise", "--report", str(report))
    code, text = _run(capsys, *args, known=noise_passes.known)
    assert code == 1 and "over the accuracy budget" in text
    assert not out.exists() and not json.loads(report.read_text())["verification"]["passed"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["optimize", "{model}", "-o", "{model}"], "would write over the input"),
        (["optimize", "{tmp}/none.onnx", "-o", "{tmp}/o.onnx"], "no such file"),
        (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--pass", "nope"], "unknown pass 'nope'"),
        (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--recipe", "{tmp}/none.yaml"], "no such recipe file"),
        (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--dim", "batch"], "expected NAME=INT"),
        (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--dim", "batch=\u00b2"], "expected NAME=INT"),
        (["optimize", "{model}", "-o", "{tmp}/none/sub/"], "its parent folder does not exist"),
        (["optimize", "{model}", "-o", "{tmp}/o.onnx", "--verify-data", "{tmp}/none.npz"], "no such file"),
        (["inspect", "{tmp}/junk.onnx"], "not an ONNX model"),
        (["verify", "{model}", "{tmp}/none.onnx"], "no such file"),
    ],
)
def test_user_errors_exit_2_without_traceback(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x96\x01garbage" * 10)
    code, text = _run(capsys, *(a.format(model=model_path, tmp=tmp_path) for a in args))
    assert code == 2
    assert message in text.replace("\n", " ") and "Traceback" not in text


def test_inspect_verify_bench_passes(tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, text = _run(capsys, "inspect", str(model_path))
    assert code == 0 and "Transpose" in text and "FLOAT" in text
    code, text = _run(capsys, "inspect", str(model_path), "--json")
    assert code == 0 and '"nodes": 6' in text
    described = json.loads(text)
    assert described["inputs"] == [{"name": "x", "dtype": "FLOAT", "shape": ["batch", 8]}] and described["outputs"]
    other = toy.save(toy.foldable(seed=5), tmp_path / "other.onnx")
    assert _run(capsys, "verify", str(model_path), str(model_path), "--max-abs", "0")[0] == 0
    assert _run(capsys, "verify", str(model_path), str(other), "--min-cosine", "0.999")[0] == 1
    np.savez(tmp_path / "x.npz", x=np.ones((2, 8), np.float32))
    code, text = _run(
        capsys, "bench", str(model_path), "--data", str(tmp_path / "x.npz"), "--runs", "5", "--threads", "1"
    )
    assert code == 0 and "median" in text and "x[1, 8]" in text
    code, text = _run(capsys, "passes")
    assert code == 0 and "fold" in text and "size_limit" in text


def test_bench_of_two_models_times_them_in_alternation_and_prints_the_ratio(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = toy.save(toy.foldable(seed=5), tmp_path / "other.onnx")
    code, text = _run(capsys, "bench", str(model_path), str(other), "--runs", "5", "--threads", "1")
    text = " ".join(text.split())
    assert code == 0 and "in alternation" in text and f"{other}: median" in text and "× the first" in text
    renamed = toy.foldable()
    for node in renamed.graph.node:
        node.input[:] = ["features" if name == "x" else name for name in node.input]
    renamed.graph.input[0].name = "features"
    code, text = _run(capsys, "bench", str(model_path), str(toy.save(renamed, tmp_path / "r.onnx")), "--runs", "2")
    assert code == 2 and "bench compares models with the same inputs" in " ".join(text.split())


def test_version_and_help_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("graphopt ")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "graphopt bench model.onnx model.int8.onnx" in text and "exit codes" in text


def test_python_dash_m_graphopt_is_the_command() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "graphopt", "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("graphopt ")


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["optimize"])
    assert info.value.code == 2


def test_ctrl_c_during_a_pass_exits_130_and_writes_nothing(
    tmp_path: Path, model_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from graphopt.passes.fold.constants import FoldConstantsPass

    def interrupted(self: FoldConstantsPass, model: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(FoldConstantsPass, "call", interrupted)
    code, text = _run(capsys, "optimize", str(model_path), "-o", str(tmp_path / "o.onnx"))
    assert code == 130 and "interrupted: nothing was written" in text
    assert not (tmp_path / "o.onnx").exists()
