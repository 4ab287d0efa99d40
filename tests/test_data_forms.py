"""The user's own data as they have it: per-sample .npz folders, a --calib-script, ORT's CalibrationDataReader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import cli, io
from graphopt.calibration.sources import DataSpec, Replayable, input_specs, iter_batches
from graphopt.errors import DataError
from tests import toy


def _text_model(path: Path) -> Path:
    """x [1, seq, 8] (per-sentence lengths) @ W -> mean over seq -> * gain (a scalar input, no sample axis)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["h2"], name="proj2"),
            helper.make_node("ReduceMean", ["h2"], ["m"], name="mean", axes=[1], keepdims=0),
            helper.make_node("Mul", ["m", "gain"], ["y"], name="gain_mul"),
        ],
        "text",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", 8]),
            helper.make_tensor_value_info("gain", TensorProto.FLOAT, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [
            numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "w2"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _feeds(count: int, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {"x": rng.normal(size=(1, int(rng.integers(3, 12)), 8)).astype(np.float32), "gain": np.float32(1.5)}
        for _ in range(count)
    ]


def _static(capsys: pytest.CaptureFixture[str], model: Path, out: Path, *data: str) -> tuple[int, str]:
    argv = ["optimize", str(model), "-o", str(out), "--pass", "quantize:mode=static", "--max-latency-ratio", "100"]
    code = cli.main([*argv, *data])
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


def test_a_folder_of_per_sample_npz_files_of_different_lengths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _text_model(tmp_path / "m.onnx")
    (tmp_path / "calib").mkdir()
    for i, feed in enumerate(_feeds(12)):
        np.savez(tmp_path / "calib" / f"{i:03d}.npz", **feed)
    code, text = _static(capsys, model, tmp_path / "o.onnx", "--calib", str(tmp_path / "calib"))
    assert code == 0, text
    assert "one .npz per sample" in text and "PASSED" in text
    assert sum(n.op_type == "QuantizeLinear" for n in onnx.load(tmp_path / "o.onnx").graph.node) >= 2


def test_an_onnx_runtime_calibration_data_reader_as_it_is(tmp_path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # the shape of readers written for ORT's quantize_static
        def __init__(self) -> None:
            self.feeds = iter(_feeds(16, seed=3))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    model = _text_model(tmp_path / "m.onnx")
    recipe = {"passes": ["quantize:mode=static"], "verify": {"samples": 4, "latency_runs": 0}}
    result = graphopt.optimize(str(model), recipe, calibration=DataSpec(source=Reader(), samples=12))
    assert result.report.passes[0].modified and result.report.verification.passed
    assert result.report.data is not None and "samples 12 to 15" in result.report.data["verification"]


def test_a_generator_is_read_once_and_replayed(tmp_path: Path) -> None:
    specs = input_specs(graphopt.load(_text_model(tmp_path / "m.onnx")))
    given = (feed for feed in _feeds(5))
    data = DataSpec(source=given, samples=5)
    assert isinstance(data.source, Replayable)
    first = [b["x"].shape for b in iter_batches(data, specs)]
    second = [b["x"].shape for b in iter_batches(data, specs)]
    assert len(first) == 5 and first == second


def test_a_calibration_script_is_imported_as_python_runs_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A generator of feeds from the user's script; dataclasses and imports of its own folder work, as with
    `python data.py`; a wrong FILE.py:FUNCTION is a user error."""
    model = _text_model(tmp_path / "m.onnx")
    (tmp_path / "helpers.py").write_text("LENGTHS = range(3, 12)\n")
    (tmp_path / "data.py").write_text(
        "from __future__ import annotations\n"
        "from dataclasses import dataclass\n"
        "import numpy as np\n"
        "from helpers import LENGTHS\n\n"
        "@dataclass\nclass Sentence:\n    length: int\n\n"
        "def feeds():\n"
        "    rng = np.random.default_rng(4)\n"
        "    for n in LENGTHS:\n"
        "        s = Sentence(n)\n"
        "        yield {'x': rng.normal(size=(1, s.length, 8)).astype(np.float32), 'gain': np.float32(1.0)}\n"
    )
    script = tmp_path / "data.py"
    code, text = _static(capsys, model, tmp_path / "o.onnx", "--calib-script", f"{script}:feeds")
    assert code == 0, text
    code, text = _static(capsys, model, tmp_path / "o.onnx", "--calib-script", f"{script}:nope")
    assert code == 2 and "has no function 'nope'" in text
    code, text = _static(capsys, model, tmp_path / "o.onnx", "--calib-script", str(script))
    assert code == 2 and "expected FILE.py:FUNCTION" in text
    (tmp_path / "broken.py").write_text(
        "import numpy as np\n\ndef feeds():\n"
        "    yield {'x': np.zeros((1, 4, 8), np.float32), 'gain': np.float32(1.0)}\n"
        "    raise KeyError('sentence 2')\n"
    )
    code, text = _static(capsys, model, tmp_path / "o.onnx", "--calib-script", f"{tmp_path / 'broken.py'}:feeds")
    assert code == 2 and "the data source failed at feed 1: KeyError" in text and "Traceback" not in text


def test_each_file_of_a_per_sample_folder_is_one_sample(tmp_path: Path) -> None:
    """A graph model fed [nodes, features] with no sample axis: every file is read, each one sample (counting the
    first input's axis 0 read 1 of 12 files and called it 35 samples)."""
    from graphopt.calibration.sources import batch_samples

    model = toy.save(toy.relu_mlp(), tmp_path / "m.onnx")
    folder = tmp_path / "graphs"
    folder.mkdir()
    for i in range(12):
        np.savez(folder / f"{i:03d}.npz", x=np.full((35 + i, 16), i, np.float32))
    specs = input_specs(io.load_model(model))
    batches = list(iter_batches(DataSpec(source=folder, samples=10), specs))
    assert [int(b["x"][0, 0]) for b in batches] == list(range(10))
    assert all(batch_samples(b) == 1 for b in batches)
    skipped = list(iter_batches(DataSpec(source=folder, samples=10, skip=10), specs))
    assert [int(b["x"][0, 0]) for b in skipped] == [10, 11]
    plan = {"passes": ["fold"], "verify": {"data": str(folder), "samples": 16, "latency_runs": 0}}
    result = graphopt.optimize(model, plan)
    assert result.report.verification is not None and result.report.verification.samples == 12


def test_a_string_input_takes_string_data_and_refuses_pickles(tmp_path: Path) -> None:
    """A model fed words (a phoneme or vocabulary lookup) takes fixed-width string arrays from an .npz; numbers for
    it, and object arrays (numpy pickles them), are refused with the fix."""
    graph = helper.make_graph(
        [
            helper.make_node(
                "CategoryMapper", ["w"], ["y"], domain="ai.onnx.ml", cats_strings=["a", "b"], cats_int64s=[1, 2]
            )
        ],
        "words",
        [helper.make_tensor_value_info("w", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 10
    path = tmp_path / "words.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "words.npz", w=np.array(["a", "b", "zz", "a"]))
    plan = {"passes": ["fold"], "verify": {"data": str(tmp_path / "words.npz"), "samples": 4, "latency_runs": 0}}
    result = graphopt.optimize(path, plan)
    assert result.report.verification is not None and result.report.verification.passed
    assert result.report.verification.samples == 4
    np.savez(tmp_path / "bytes.npz", w=np.array([b"a", b"b", b"zz", b"a"]))  # ORT would read b"a" as "b'a'"
    specs = input_specs(graphopt.load(path))
    (fed,) = list(iter_batches(DataSpec(source=str(tmp_path / "bytes.npz"), samples=4, batch_size=4), specs))
    assert fed["w"].dtype == object and list(fed["w"]) == ["a", "b", "zz", "a"]
    np.savez(tmp_path / "numbers.npz", w=np.arange(4, dtype=np.float32))
    with pytest.raises(DataError, match="input 'w' takes strings"):
        graphopt.optimize(path, {**plan, "verify": {**plan["verify"], "data": str(tmp_path / "numbers.npz")}})
    np.savez(tmp_path / "objects.npz", w=np.array(["a", None], dtype=object))
    with pytest.raises(DataError, match="stores as a pickle"):
        graphopt.optimize(path, {**plan, "verify": {**plan["verify"], "data": str(tmp_path / "objects.npz")}})


def test_a_folder_for_another_model_is_named_in_the_error(tmp_path: Path) -> None:
    model = toy.save(toy.relu_mlp(), tmp_path / "m.onnx")
    folder = tmp_path / "other"
    folder.mkdir()
    np.savez(folder / "000.npz", image=np.zeros((1, 16), np.float32))
    specs = input_specs(io.load_model(model))
    expected = rf"a file of {folder} lacks the model's input\(s\) \['x'\]; it has \['image'\]"
    with pytest.raises(DataError, match=expected):
        list(iter_batches(DataSpec(source=folder), specs))
