"""Hostile and broken inputs through the graphopt CLI: each must be a clean exit-2 error.

For every case the CLI runs in a fresh process; we check the exit code, that no
traceback was printed, and that nothing was written anywhere in the case's folder tree.

    python bench/hostile_files.py [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class Case:
    """One hostile input: how to make it and the CLI arguments that feed it to graphopt."""

    name: str
    make: Callable[[Path], list[str]]  # writes files under the folder, returns CLI args


def _model(
    nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto] = (), opset: int = 18, **kw: object
) -> onnx.ModelProto:
    inputs = kw.pop("inputs", None) or [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])]
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], list(inits)
    )
    opsets = [helper.make_opsetid("", opset), *kw.pop("extra_opsets", [])]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model


def _good() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    return _model([helper.make_node("MatMul", ["x", "W"], ["y"])], [w])


def _write(folder: Path, name: str, data: bytes | onnx.ModelProto) -> Path:
    path = folder / name
    path.write_bytes(data if isinstance(data, bytes) else data.SerializeToString())
    return path


def _optimize(path: Path, folder: Path) -> list[str]:
    return ["optimize", str(path), "-o", str(folder / "out" / "out.onnx")]


def _external(
    folder: Path,
    location: str,
    *,
    symlink_out: bool = False,
    truncate: bool = False,
    hard_link_out: bool = False,
    **entries: str,
) -> list[str]:
    model_dir = folder / "model"
    model_dir.mkdir()
    proto = _good()
    onnx.save(proto, str(model_dir / "m.onnx"), save_as_external_data=True, location="w.data", size_threshold=0)
    data = model_dir / "w.data"
    if symlink_out:
        outside = folder / "secret.data"
        data.rename(outside)
        data.symlink_to(outside)
    if truncate:
        data.write_bytes(data.read_bytes()[:8])
    if hard_link_out:  # a hard link is the outside file itself, whatever folder it is listed in
        data.rename(folder / "secret.data")
        data.hardlink_to(folder / "secret.data")
    proto = onnx.load(str(model_dir / "m.onnx"), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    for key, value in entries.items():
        entry = proto.graph.initializer[0].external_data.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(model_dir / "m.onnx"))
    (folder / "secret.data").write_bytes(b"\0" * 64) if not (symlink_out or hard_link_out) else None
    return _optimize(model_dir / "m.onnx", folder)


def external_tensor(array: np.ndarray, name: str, location: str) -> onnx.TensorProto:
    """``array`` as a tensor whose bytes are external data at ``location`` (offset 0, its full length)."""
    tensor = numpy_helper.from_array(array, name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def function_constant_model(array: np.ndarray, location: str) -> onnx.ModelProto:
    """y = x @ C, with C a Constant inside a model-local function, its value external data at ``location``."""
    constant = helper.make_node("Constant", [], ["c"], value=external_tensor(array, "C", location))
    function = helper.make_function(
        "local",
        "F",
        ["a"],
        ["b"],
        [constant, helper.make_node("MatMul", ["a", "c"], ["b"])],
        [helper.make_opsetid("", 18)],
    )
    model = _model(
        [helper.make_node("F", ["x"], ["y"], domain="local")], extra_opsets=[helper.make_opsetid("local", 1)]
    )
    model.functions.append(function)
    return model


def _sparse(folder: Path, location: str, *, symlink_out: bool = False, constant: bool = False) -> list[str]:
    """W as a sparse initializer (or a Constant's sparse value) whose values are external data at ``location``."""
    model_dir = folder / "model"
    model_dir.mkdir()
    values = np.ones(16, np.float32)
    (folder / "secret.data").write_bytes(values.tobytes())
    if symlink_out:
        (model_dir / "v.data").symlink_to(folder / "secret.data")
    else:
        (model_dir / "v.data").write_bytes(values.tobytes())
    indices = numpy_helper.from_array(np.arange(16, dtype=np.int64), "W_idx")
    sparse = helper.make_sparse_tensor(external_tensor(values, "W", location), indices, [4, 4])
    matmul = helper.make_node("MatMul", ["x", "W"], ["y"])
    if constant:
        model = _model([helper.make_node("Constant", [], ["W"], sparse_value=sparse), matmul])
    else:
        model = _model([matmul])
        model.graph.sparse_initializer.append(sparse)
    return _optimize(_write(model_dir, "m.onnx", model), folder)


def _function_constant(folder: Path, location: str) -> list[str]:
    """The function-Constant model in model/, its value's external data at ``location``."""
    model_dir = folder / "model"
    model_dir.mkdir()
    (folder / "secret.data").write_bytes(np.ones(16, np.float32).tobytes())
    model = function_constant_model(np.ones((4, 4), np.float32), location)
    return _optimize(_write(model_dir, "m.onnx", model), folder)


def _link(target: Path, link: Path, *, hard: bool = False) -> Path:
    link.hardlink_to(target) if hard else link.symlink_to(target)
    return link


def _clash(flags: Callable[[Path, Path], list[str]], location: str = "w.data") -> Callable[[Path], list[str]]:
    """A run of the good model (weight in external file ``location``) with ``flags(model, folder)``: a
    destination that is a file the run reads or another destination. -o defaults to out/out.onnx."""

    def make(folder: Path) -> list[str]:
        (folder / "model").mkdir()
        model = folder / "model" / "m.onnx"
        onnx.save(_good(), str(model), save_as_external_data=True, location=location, size_threshold=0)
        args = flags(model, folder)
        return ["optimize", str(model), *([] if "-o" in args else ["-o", str(folder / "out" / "out.onnx")]), *args]

    return make


def _file(path: Path, text: str = "") -> Path:
    path.write_text(text)
    return path


def _calib(folder: Path) -> Path:
    np.savez(folder / "calib.npz", x=np.ones((2, 4), np.float32))
    return folder / "calib.npz"


def _report_dir_holds_input(folder: Path) -> list[str]:
    (folder / "rd").mkdir()
    model = _write(folder / "rd", "report.md", _good())  # any name is a model's name
    return [*_optimize(model, folder), "--report-dir", str(folder / "rd")]


def _huge_dims(folder: Path) -> list[str]:
    tensor = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[1 << 20, 1 << 20], raw_data=b"\0" * 16)
    return _optimize(_write(folder, "m.onnx", _model([helper.make_node("Add", ["x", "W"], ["y"])], [tensor])), folder)


def _negative_dims(folder: Path) -> list[str]:
    tensor = onnx.TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[-3, 4], raw_data=b"\0" * 16)
    return _optimize(_write(folder, "m.onnx", _model([helper.make_node("Add", ["x", "W"], ["y"])], [tensor])), folder)


def _huge_input(folder: Path) -> list[str]:
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1 << 31, 1 << 31])]
    model = _model([helper.make_node("Relu", ["x"], ["y"])], inputs=inputs)
    return _optimize(_write(folder, "m.onnx", model), folder)


def _unknown_domain(folder: Path) -> list[str]:
    model = _model(
        [helper.make_node("Baz", ["x"], ["y"], domain="foo.bar")], extra_opsets=[helper.make_opsetid("foo.bar", 1)]
    )
    return _optimize(_write(folder, "m.onnx", model), folder)


def _hostile_recipe(folder: Path) -> list[str]:
    recipe = folder / "r.yaml"
    recipe.write_text("passes: !!python/object/apply:os.system ['touch pwned']\n")
    return [*_optimize(_write(folder, "m.onnx", _good()), folder), "--recipe", str(recipe)]


def _pickled_npz(folder: Path) -> list[str]:
    np.savez(folder / "calib.npz", x=np.array([{"a": 1}], dtype=object))
    return [*_optimize(_write(folder, "m.onnx", _good()), folder), "--verify-data", str(folder / "calib.npz")]


# Hostile model files and destinations, by class (bench/hostile_files.py reports per class).
CLASSES: dict[str, tuple[Case, ...]] = {
    "malformed model files": (
        Case("empty file", lambda f: _optimize(_write(f, "m.onnx", b""), f)),
        Case("random bytes", lambda f: _optimize(_write(f, "m.onnx", np.random.default_rng(0).bytes(4096)), f)),
        Case("truncated model", lambda f: _optimize(_write(f, "m.onnx", _good().SerializeToString()[:60]), f)),
        Case(
            "protobuf that is not a model",
            lambda f: _optimize(
                _write(f, "m.onnx", numpy_helper.from_array(np.ones(8, np.float32)).SerializeToString()), f
            ),
        ),
        Case("missing model file", lambda f: _optimize(f / "nope.onnx", f)),
        Case("a folder, not a file", lambda f: _optimize(f, f)),
    ),
    "malformed model contents": (
        Case("huge dims", _huge_dims),
        Case("negative dims", _negative_dims),
        Case("huge graph input", _huge_input),
        Case("op from an unknown domain", _unknown_domain),
        Case(
            "opset newer than installed",
            lambda f: _optimize(_write(f, "m.onnx", _model([helper.make_node("Relu", ["x"], ["y"])], opset=40)), f),
        ),
    ),
    "hostile recipes and data": (
        Case("recipe with a python object tag", _hostile_recipe),
        Case("pickled object array as data", _pickled_npz),
    ),
    "a destination is a file the run reads or writes": (
        Case(
            "-o is the input's external data",
            _clash(lambda m, f: ["-o", str(m.parent / "w.data"), "--pass", "quantize"]),
        ),
        Case("-o is a symlink to the input", _clash(lambda m, f: ["-o", str(_link(m, f / "out" / "o.onnx"))])),
        Case(
            "-o is a hard link to the input",
            _clash(lambda m, f: ["-o", str(_link(m, f / "out" / "o.onnx", hard=True))]),
        ),
        Case(
            "--external-data writes the input's data",
            _clash(
                lambda m, f: ["-o", str(m.parent / "out.onnx"), "--external-data", "--pass", "quantize"],
                "out.onnx.data",
            ),
        ),
        Case("--report is the input", _clash(lambda m, f: ["--report", str(m)])),
        Case("--report is the output", _clash(lambda m, f: ["--report", str(f / "out" / "out.onnx")])),
        Case(
            "--report-md links to the input's data",
            _clash(lambda m, f: ["--report-md", str(_link(m.parent / "w.data", f / "r.md"))]),
        ),
        Case("--report is --report-md", _clash(lambda m, f: ["--report", str(f / "r"), "--report-md", str(f / "r")])),
        Case(
            "--report is in --report-dir",
            _clash(lambda m, f: ["--report", str(f / "report.json"), "--report-dir", str(f)]),
        ),
        Case("--report-dir holds the input", _report_dir_holds_input),
        Case(
            "--report is the calibration data",
            _clash(lambda m, f: ["--calib", str(_calib(f)), "--report", str(f / "calib.npz")]),
        ),
        Case(
            "--report-md is the recipe",
            _clash(
                lambda m, f: [
                    "--recipe",
                    str(_file(f / "r.yaml", "passes: [fold]\n")),
                    "--report-md",
                    str(f / "r.yaml"),
                ]
            ),
        ),
    ),
    "external data outside the model folder": (
        Case("missing external data", lambda f: _external(f, "gone.data")),
        Case("external data ../ escape", lambda f: _external(f, "../secret.data")),
        Case("external data absolute path", lambda f: _external(f, str(f / "secret.data"))),
        Case("external data symlink out", lambda f: _external(f, "w.data", symlink_out=True)),
        Case("truncated external data", lambda f: _external(f, "w.data", truncate=True)),
        Case("sparse external data ../ escape", lambda f: _sparse(f, "../secret.data")),
        Case("sparse external data absolute path", lambda f: _sparse(f, str(f / "secret.data"))),
        Case("sparse external data symlink out", lambda f: _sparse(f, "v.data", symlink_out=True)),
        Case("sparse Constant external data ../ escape", lambda f: _sparse(f, "../secret.data", constant=True)),
        Case("function Constant external data ../ escape", lambda f: _function_constant(f, "../secret.data")),
        Case("function Constant external data absolute path", lambda f: _function_constant(f, str(f / "secret.data"))),
        Case("external data hard-linked from outside", lambda f: _external(f, "w.data", hard_link_out=True)),
        Case("external data negative offset", lambda f: _external(f, "w.data", offset="-8")),
        Case("external data length not an integer", lambda f: _external(f, "w.data", length="64.0")),
        Case("external data location too long", lambda f: _external(f, "w" * 5000)),
    ),
    "destinations that cannot be written": (
        Case("--report into a missing folder", _clash(lambda m, f: ["--report", str(f / "nope" / "r.json")])),
        Case("--report-dir is a file", _clash(lambda m, f: ["--report-dir", str(_file(f / "afile"))])),
        Case("-o inside a file", _clash(lambda m, f: ["-o", str(_file(f / "afile") / "o.onnx")])),
        Case("--report is a folder", _clash(lambda m, f: ["--report", str(f / "out")])),
        Case("demo --out is a file", lambda f: ["demo", "--out", str(_file(f / "afile"))]),
    ),
}
CASES: tuple[Case, ...] = tuple(case for cases in CLASSES.values() for case in cases)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (not following symlinks) under ``folder`` with a digest of its bytes (a link: its target)."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            content = os.readlink(path).encode() if path.is_symlink() else path.read_bytes()
            files[str(path)] = hashlib.sha256(content).hexdigest()
    return files


def run_case(case: Case) -> dict[str, object]:
    """Run one case through the CLI in a fresh process; what it printed, wrote, removed and changed."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "out").mkdir()
        args = case.make(folder)
        before = snapshot(folder)
        done = subprocess.run(
            [sys.executable, "-m", "graphopt.cli", *args], capture_output=True, text=True, cwd=tmp, timeout=300
        )
        after = snapshot(folder)
        text = done.stdout + done.stderr
        return {
            "case": case.name,
            "exit_code": done.returncode,
            "traceback": "Traceback" in text,
            "files_written": sorted(set(after) - set(before)),
            "files_removed": sorted(set(before) - set(after)),
            "files_changed": sorted(p for p in set(before) & set(after) if before[p] != after[p]),
            "message": _error_line(done.stderr),
        }


def _error_line(stderr: str) -> str:
    """graphopt's ``error:`` line (after argparse's usage or ONNX Runtime's log lines), else the start of stderr."""
    found = re.findall(r"(?:^|: )(error: .*(?:\n(?!\S+: ).*)*)", stderr, flags=re.MULTILINE)
    text = found[-1] if found else stderr
    return " ".join(text.split())[:200]


def clean(row: dict[str, object]) -> bool:
    """Exit 2, an ``error:`` line, no traceback, and no file written, removed or changed."""
    untouched = not (row["files_written"] or row["files_removed"] or row["files_changed"])
    return row["exit_code"] == 2 and not row["traceback"] and untouched and str(row["message"]).startswith("error:")


def main(argv: list[str] | None = None) -> int:
    """Run every hostile file and user-error case; a table per class, then every case."""
    from tests.harness import hostile_user_errors

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    classes = {**CLASSES, **hostile_user_errors.CLASSES}
    rows = [{"class": kind, **run_case(case)} for kind, cases in classes.items() for case in cases]
    print("| class | cases | exit 2 | traceback | inputs changed or removed | files written | clean |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind in classes:
        group = [r for r in rows if r["class"] == kind]
        print(
            f"| {kind} | {len(group)} | {sum(r['exit_code'] == 2 for r in group)} | "
            f"{sum(bool(r['traceback']) for r in group)} | "
            f"{sum(bool(r['files_changed'] or r['files_removed']) for r in group)} | "
            f"{sum(bool(r['files_written']) for r in group)} | {sum(clean(r) for r in group)} |"
        )
    print(f"| all | {len(rows)} | | | | | {sum(clean(r) for r in rows)} |\n")
    print("| class | case | exit code | traceback | message |\n|---|---|---:|---|---|")
    for r in rows:
        message = str(r["message"]).replace("|", "/")
        print(f"| {r['class']} | {r['case']} | {r['exit_code']} | {'yes' if r['traceback'] else 'no'} | {message} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0 if all(clean(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
