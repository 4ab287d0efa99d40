"""What graphopt reads is never written, only its own temporaries are removed, external data is read from
the model's folder only, and a run stopped by SIGTERM or handed a FIFO ends cleanly.

tests/harness/hostile_files.py holds the cases that are plain exit-2 errors writing nothing; these check
what that harness cannot: bytes left unchanged, which folders survive a clean-up, signals, hangs.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import cli, commands, destinations, io
from graphopt.errors import ModelLoadError, ModelSaveError
from tests.harness.hostile_files import external_tensor, function_constant_model
from tests.test_interrupted_save import _big_model

WEIGHT = np.arange(16, dtype=np.float32).reshape(4, 4)


def _model(nodes: list[onnx.NodeProto], **kw: object) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        kw.pop("initializers", []),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), *kw.pop("opsets", [])], **kw)
    model.ir_version = 10
    return model


def _with_data(folder: Path, location: str = "w.data", name: str = "m.onnx") -> Path:
    """y = x @ W with W in the external file ``location`` beside the model."""
    folder.mkdir(parents=True, exist_ok=True)
    w = numpy_helper.from_array(WEIGHT, "W")
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], initializers=[w])
    onnx.save(model, str(folder / name), save_as_external_data=True, location=location, size_threshold=0)
    return folder / name


def _run(args: list[str]) -> int:
    return cli.main([str(a) for a in args])


def _state(*paths: Path) -> list[tuple[bytes, int]]:
    return [(p.read_bytes(), p.stat().st_mtime_ns) for p in paths]


# --- 1. every file written is checked against every file read ---------------------------------------------


@pytest.mark.parametrize(
    ("data_name", "flags", "message"),
    [
        ("w.data", ["-o", "{data}", "--pass", "quantize"], "would write over the input's external data"),
        ("out.onnx.data", ["-o", "{dir}/out.onnx", "--external-data", "--pass", "quantize"], "would write over"),
        ("w.data", ["-o", "{out}", "--report", "{model}"], "--report .* would write over the input model"),
        ("w.data", ["-o", "{out}", "--report-md", "{data}"], "--report-md .* would write over"),
        ("w.data", ["-o", "{out}", "--report-dir", "{dir}", "--report", "{dir}/report.md"], "are the same file"),
    ],
    ids=["-o data file", "--external-data", "--report model", "--report-md data", "report clash"],
)
def test_a_refused_run_leaves_the_input_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], data_name: str, flags: list[str], message: str
) -> None:
    model = _with_data(tmp_path / "model", data_name)
    data = model.parent / data_name
    before = _state(model, data)
    names = {"data": data, "dir": model.parent, "model": model, "out": tmp_path / "out.onnx"}
    assert _run(["optimize", model, *(f.format(**names) for f in flags)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith("error:") and "Traceback" not in err
    assert re.search(message, err), err
    assert _state(model, data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_report_never_replaces_the_output(tmp_path: Path) -> None:
    model = _with_data(tmp_path / "model")
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous output")
    assert _run(["optimize", model, "-o", out, "--pass", "fold", "--report", out]) == 2
    assert out.read_bytes() == b"previous output"


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_save_refuses_links_to_what_it_read(tmp_path: Path, link: str) -> None:
    source = _with_data(tmp_path / "model", name="m.onnx")
    model = io.load_model(source)
    target = tmp_path / "link.onnx"
    getattr(target, f"{link}_to")(source)
    with pytest.raises(ModelSaveError, match="would write over the input"):
        io.save_model(model, target)  # the loaded model remembers its files: no protect= needed
    assert onnx.load(str(source), load_external_data=False).graph.initializer[0].name == "W"


def test_save_refuses_a_sparse_initializers_data_file(tmp_path: Path) -> None:
    """Sparse initializers are densified at load: the file they came from is protected all the same."""
    path = _sparse_model(tmp_path / "model")
    before = _state(path.parent / "v.data")
    with pytest.raises(ModelSaveError, match="would write over the input"):
        io.save_model(io.load_model(path), path.parent / "v.data")
    assert _state(path.parent / "v.data") == before


# --- 2. only graphopt's own temporaries are removed ----------------------------------------------------------


def _aged(path: Path) -> Path:
    old = time.time() - destinations.STALE_TEMP_SECONDS - 60
    os.utime(path, (old, old))
    return path


def _marked(folder: Path) -> Path:
    folder.mkdir()
    marker = b"graphopt temporary folder: removed when its save ends, or by a later save if it was killed\n"
    (folder / destinations.TEMP_MARKER).write_bytes(marker + b"pid 1\n")
    (folder / "m.onnx").write_bytes(b"half a model")
    return folder


def test_only_marked_stale_temporaries_are_removed(tmp_path: Path) -> None:
    source = _with_data(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    user = [out / ".graphopt-backup", out / ".graphopt-tmp-mine", out / ".graphopt-tmp-keep"]
    for folder in user:
        folder.mkdir()
        (folder / "precious.txt").write_text("mine")
    (user[2] / destinations.TEMP_MARKER).write_text("a marker that is not graphopt's")
    elsewhere = _marked(tmp_path / "elsewhere")  # marked, but reached through a link: not a folder of ours
    (out / ".graphopt-tmp-link").symlink_to(elsewhere)
    fresh = _marked(out / ".graphopt-tmp-fresh")  # maybe another save under way: too young to be stale
    stale = _marked(out / ".graphopt-tmp-stale")
    (stale / ".m.onnx.data.x1y2").mkdir()  # onnx_ir writes external data through a folder of its own
    for folder in [*user, elsewhere, stale]:
        _aged(folder)
    io.save_model(io.load_model(source), out / "m.onnx")
    assert all((folder / "precious.txt").read_text() == "mine" for folder in user)
    assert (elsewhere / "m.onnx").exists() and (out / ".graphopt-tmp-link").is_symlink()
    assert (fresh / "m.onnx").exists()
    assert not stale.exists()


def test_a_run_leaves_no_temporaries(tmp_path: Path) -> None:
    source = _with_data(tmp_path / "model")
    out = tmp_path / "out"
    out.mkdir()
    args = ["optimize", source, "-o", out / "m.onnx", "--pass", "fold", "--report", out / "r.json"]
    assert _run([*args, "--report-md", out / "r.md", "--report-dir", tmp_path / "reports" / "run1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["m.onnx", "r.json", "r.md"]
    assert {"report.json", "report.md"} <= {p.name for p in (tmp_path / "reports" / "run1").iterdir()}
    assert not list(tmp_path.rglob(".graphopt-*"))


# --- 3. external data is resolved against the model's folder, never the current one --------------------------


def _sparse_model(folder: Path) -> Path:
    """y = x @ W, W a sparse initializer whose values lie in v.data beside the model."""
    folder.mkdir(parents=True)
    flat = np.flatnonzero(WEIGHT)
    (folder / "v.data").write_bytes(WEIGHT.ravel()[flat].tobytes())
    values = external_tensor(WEIGHT.ravel()[flat], "W", "v.data")
    sparse = helper.make_sparse_tensor(values, numpy_helper.from_array(flat.astype(np.int64), "W_idx"), [4, 4])
    model = _model([helper.make_node("MatMul", ["x", "W"], ["y"])])
    model.graph.sparse_initializer.append(sparse)
    onnx.save(model, str(folder / "m.onnx"))
    return folder / "m.onnx"


def _function_model(folder: Path) -> Path:
    """y = x @ C, C a Constant inside a model-local function, its value in c.data beside the model."""
    folder.mkdir(parents=True)
    (folder / "c.data").write_bytes(WEIGHT.tobytes())
    onnx.save(function_constant_model(WEIGHT, "c.data"), str(folder / "m.onnx"))
    return folder / "m.onnx"


@pytest.mark.parametrize("make", [_sparse_model, _function_model], ids=["sparse initializer", "function Constant"])
def test_external_data_is_read_from_the_models_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: object
) -> None:
    path = make(tmp_path / "model")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name in ("v.data", "c.data"):  # a decoy where a path relative to the current folder would land
        (cwd / name).write_bytes((WEIGHT * 100).tobytes())
    monkeypatch.chdir(cwd)
    out = tmp_path / "out.onnx"
    assert _run(["optimize", path, "-o", out, "--pass", "fold", "--no-verify"]) == 0
    assert _run(["inspect", path]) == 0
    import onnxruntime as ort

    result = ort.InferenceSession(str(out)).run(None, {"x": np.eye(4, dtype=np.float32)})[0]
    np.testing.assert_array_equal(result, WEIGHT)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"offset": "-4"}, "not a non-negative integer"),
        ({"offset": "4x"}, "not a non-negative integer"),
        ({"length": "1e3"}, "not a non-negative integer"),
        ({"length": "4096"}, "truncated"),
        ({"location": "w" * 2000}, "not a plain path"),
        ({"location": "sub"}, "not a regular file"),
        ({"location": "pipe"}, "not a regular file"),
    ],
    ids=["negative offset", "offset text", "length float", "length past the end", "long location", "folder", "fifo"],
)
def test_external_references_are_checked(tmp_path: Path, entries: dict[str, str], message: str) -> None:
    path = _with_data(tmp_path / "model")
    (path.parent / "sub").mkdir()
    os.mkfifo(path.parent / "pipe")
    proto = onnx.load(str(path), load_external_data=False)
    tensor = proto.graph.initializer[0]
    info = {e.key: e.value for e in tensor.external_data} | entries
    del tensor.external_data[:]
    for key, value in info.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    with pytest.raises(ModelLoadError, match=message):
        io.load_model(path)


# --- 4. destinations are checked before any pass runs ---------------------------------------------------------


@pytest.fixture
def no_pass_may_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pass ran before the destinations were checked")

    monkeypatch.setattr(commands, "optimize", refuse)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--report", "{tmp}/nope/r.json"], "folder .*nope does not exist"),
        (["--report-md", "{tmp}/out"], "is a folder"),
        (["--report-dir", "{tmp}/afile"], "afile is a file, not a folder"),
        (["--report-dir", "{tmp}/afile/deeper"], "afile is a file, not a folder"),
        (["-o", "{tmp}/afile/o.onnx"], "afile is a file, not a folder"),
    ],
    ids=["report missing folder", "report-md folder", "report-dir file", "report-dir under a file", "-o under a file"],
)
def test_unwritable_destinations_are_refused_before_any_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_pass_may_run: None, flags: list[str], message: str
) -> None:
    source = _with_data(tmp_path / "model")
    (tmp_path / "out").mkdir()
    (tmp_path / "afile").write_text("")
    flags = [f.format(tmp=tmp_path) for f in flags]
    args = ["optimize", source, *([] if "-o" in flags else ["-o", tmp_path / "out" / "m.onnx"]), *flags]
    assert _run(args) == 2
    assert re.search(message, " ".join(capsys.readouterr().err.split()))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_folder_is_refused_before_any_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_pass_may_run: None
) -> None:
    source = _with_data(tmp_path / "model")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert _run(["optimize", source, "-o", locked / "m.onnx"]) == 2
    finally:
        locked.chmod(0o755)
    assert "is not writable" in capsys.readouterr().err


# --- 5. SIGTERM during a save is an interruption ----------------------------------------------------------------


def test_sigterm_during_save_exits_130_and_removes_its_temporary(tmp_path: Path) -> None:
    source = _big_model(tmp_path / "big.onnx")
    out = tmp_path / "out"
    out.mkdir()
    args = ["optimize", source, "-o", out / "m.onnx", "--pass", "fold", "--no-verify", "--external-data"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "graphopt.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not list(out.glob(f".graphopt-*/{destinations.TEMP_MARKER}")) and proc.poll() is None:
        assert time.monotonic() < deadline, "the save never started"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"interrupted" in err and b"Traceback" not in err
    assert list(out.iterdir()) == []


# --- 6. data paths must be regular files: a FIFO would hang the run --------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["optimize", "{model}", "-o", "{tmp}/out.onnx", "--pass", "fold", "--verify-data", "{tmp}/fifo.npz"],
        ["optimize", "{model}", "-o", "{tmp}/out.onnx", "--pass", "fold", "--calib", "{tmp}/fifo.npz"],
        ["optimize", "{model}", "-o", "{tmp}/out.onnx", "--pass", "fold", "--verify-data", "{tmp}/npys"],
        ["verify", "{model}", "{model}", "--data", "{tmp}/fifo.npz"],
        ["bench", "{model}", "--data", "{tmp}/npys/x.npy", "--runs", "1", "--warmup", "0"],
    ],
    ids=["--verify-data", "--calib", "folder with a fifo", "verify --data", "bench --data .npy"],
)
def test_a_fifo_as_data_is_refused_not_waited_on(tmp_path: Path, args: list[str]) -> None:
    model = _with_data(tmp_path / "model")
    os.mkfifo(tmp_path / "fifo.npz")
    (tmp_path / "npys").mkdir()
    os.mkfifo(tmp_path / "npys" / "x.npy")
    command = [sys.executable, "-m", "graphopt.cli", *(a.format(model=model, tmp=tmp_path) for a in args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "not a regular file" in done.stderr and "Traceback" not in done.stderr
