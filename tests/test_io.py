from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import io, prober, runtime
from graphopt.errors import ModelLoadError, ModelSaveError
from tests import toy


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return toy.save(toy.foldable(), tmp_path / "model.onnx")


def _external_model(tmp_path: Path, location: str) -> Path:
    """Save a model with external data, then point its tensor at ``location``."""
    folder = tmp_path / "ext"
    folder.mkdir()
    proto = toy.already_folded()
    onnx.save(proto, str(folder / "model.onnx"), save_as_external_data=True, location="w.data", size_threshold=0)
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(folder / "model.onnx"))
    return folder / "model.onnx"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        (b"", "the file is empty"),
        (os.urandom(4096), "not an ONNX model"),
        (numpy_helper.from_array(np.ones(3, np.float32)).SerializeToString(), "is not an ONNX model"),
    ],
    ids=["missing", "empty", "random", "tensor-not-model"],
)
def test_bad_files_give_clear_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        io.load_model(path)


def test_truncated_model(tmp_path: Path, model_path: Path) -> None:
    data = model_path.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError):
        io.load_model(path)


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("../outside.data", "not a plain path relative"),
        ("/etc/passwd", "not a plain path relative"),
        ("missing.data", "does not exist"),
    ],
)
def test_external_data_must_stay_inside(tmp_path: Path, location: str, message: str) -> None:
    (tmp_path / "outside.data").write_bytes(b"\0" * 1024)
    with pytest.raises(ModelLoadError, match=message):
        io.load_model(_external_model(tmp_path, location))


def test_external_data_symlink_out_is_refused(tmp_path: Path) -> None:
    path = _external_model(tmp_path, "w.data")
    real = path.parent / "w.data"
    moved = tmp_path / "elsewhere.data"
    real.rename(moved)
    real.symlink_to(moved)
    with pytest.raises(ModelLoadError, match="resolves outside"):
        io.load_model(path)


def test_truncated_external_data(tmp_path: Path) -> None:
    path = _external_model(tmp_path, "w.data")
    data = path.parent / "w.data"
    data.write_bytes(data.read_bytes()[:8])
    with pytest.raises(ModelLoadError, match="truncated"):
        io.load_model(path)


def test_external_data_round_trip(tmp_path: Path) -> None:
    path = _external_model(tmp_path, "w.data")
    model = io.load_model(path)
    out = tmp_path / "out" / "inline.onnx"
    out.parent.mkdir()
    saved = io.save_model(model, out, protect=[path])
    assert saved.data_path is None
    assert io.load_model(out).graph.initializers["W"].const_value.numpy().shape == (8, 4)
    saved = io.save_model(io.load_model(path), tmp_path / "out" / "ext.onnx", external_data=True)
    assert saved.data_path is not None and saved.data_path.name == "ext.onnx.data"
    assert io.load_model(saved.path).graph.initializers["W"].const_value.numpy().shape == (8, 4)


def test_save_refuses_input_and_its_data(tmp_path: Path, model_path: Path) -> None:
    with pytest.raises(ModelSaveError, match="would write over the input"):
        io.save_model(io.load_model(model_path), model_path, protect=[model_path])
    ext = _external_model(tmp_path, "w.data")
    model = io.load_model(ext)
    with pytest.raises(ModelSaveError, match="would write over the input"):
        io.save_model(model, ext.parent / "w.data")


def test_save_leaves_no_temporary_files(tmp_path: Path, model_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    io.save_model(io.load_model(model_path), out_dir / "m.onnx")
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.onnx"]


def test_failed_save_keeps_previous_output(tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")

    def broken(path: Path) -> None:
        raise ModelSaveError("ORT cannot load it")

    monkeypatch.setattr(runtime, "check_loads", broken)
    with pytest.raises(ModelSaveError):
        io.save_model(io.load_model(model_path), out)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "out.onnx"]


def test_save_missing_folder(tmp_path: Path, model_path: Path) -> None:
    with pytest.raises(ModelSaveError, match="does not exist"):
        io.save_model(io.load_model(model_path), tmp_path / "nope" / "m.onnx")


def test_ir_version_is_one_ort_loads(tmp_path: Path) -> None:
    proto = toy.foldable()
    proto.ir_version = onnx.IR_VERSION  # onnx writes the newest IR by default
    model = io.load_model(toy.save(proto, tmp_path / "new_ir.onnx"))
    saved = io.save_model(model, tmp_path / "out.onnx")
    assert saved.ir_version <= runtime.max_ir_version()
    assert onnx.load(str(saved.path)).ir_version == saved.ir_version


def test_exporter_debug_metadata_is_dropped_unless_kept(tmp_path: Path) -> None:
    from importlib import resources

    bundled = Path(str(resources.files("graphopt") / "data" / "digits_cnn.onnx"))
    model = io.load_model(bundled)
    model.graph.node(0).metadata_props["owner"] = "team"  # not an exporter debug key: kept

    def keys(path: Path) -> set[str]:
        return {p.key for n in onnx.load(str(path)).graph.node for p in n.metadata_props}

    assert any(k.startswith("pkg.torch.onnx.") for k in keys(bundled))
    plain = io.save_model(model, tmp_path / "plain.onnx")
    kept = io.save_model(model, tmp_path / "kept.onnx", keep_debug_metadata=True)
    assert keys(plain.path) == {"owner", "pkg.torch.onnx.name_scopes"}  # scopes map PEFT adapters
    assert keys(kept.path) == keys(bundled) | {"owner"}
    assert plain.bytes_on_disk < 0.95 * kept.bytes_on_disk
    assert "pkg.torch.onnx.stack_trace" in model.graph.node(0).metadata_props  # the caller's model is unchanged


def test_sparse_initializers_are_densified(tmp_path: Path) -> None:
    proto = toy.already_folded()
    dense = numpy_helper.to_array(proto.graph.initializer[0])
    dense = np.where(np.abs(dense) > 0.8, dense, 0).astype(np.float32)
    flat = np.flatnonzero(dense)
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(dense.ravel()[flat], "W"),
        numpy_helper.from_array(flat.astype(np.int64), "W_idx"),
        dense.shape,
    )
    del proto.graph.initializer[0]
    proto.graph.sparse_initializer.append(sparse)
    model = io.load_model(toy.save(proto, tmp_path / "sparse.onnx"))
    np.testing.assert_array_equal(model.graph.initializers["W"].const_value.numpy(), dense)


def test_a_model_only_onnx_runtime_accepts_is_a_valid_input(tmp_path: Path) -> None:
    """ORT registers ops of its own in the default domain (ORT GenAI's exports): its load decides, not the checker."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "W")
    scale = numpy_helper.from_array(np.ones(8, np.float32), "scale")
    graph = helper.make_graph(
        [
            helper.make_node("SimplifiedLayerNormalization", ["x", "scale"], ["n"], axis=-1, epsilon=1e-5),
            helper.make_node("MatMul", ["n", "W"], ["y"]),
        ],
        "genai",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [w, scale],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path / "genai.onnx"
    onnx.save(proto, path)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(str(path))
    result = graphopt.optimize(path, ["fold", "weight_only"])
    saved = io.save_model(result.model, tmp_path / "out.onnx", protect=[path])
    assert saved.path.exists()


def test_an_onnx_runtime_crash_while_loading_the_output_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ORT can segfault while optimizing a graph (1.31 on nsnet2 after fp16): the child dies, graphopt reports it."""
    crashing = tmp_path / "crashing-python"
    crashing.write_text("#!/bin/sh\nkill -SEGV $$\n")
    crashing.chmod(0o755)
    path = toy.save(toy.foldable(), tmp_path / "m.onnx")
    prober.probe_load(path)  # a healthy load in a child process passes
    prober.probe_load(path)  # and again, in the same child
    prober.close()  # the next probe starts a new child: one that crashes
    monkeypatch.setattr(prober.sys, "executable", str(crashing))
    with pytest.raises(ModelLoadError, match=r"crashes \(signal 11\)"):
        prober.probe_load(path)
    model = io.load_model(path)
    with pytest.raises(graphopt.errors.PassError, match="crashes"):
        io.save_model(model, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_saving_with_external_data_maps_the_written_tensors(tmp_path: Path) -> None:
    """After a save with external data, in-memory weights read the written file (same values, no second copy in
    memory), and the model can still be saved again or run."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    src = tmp_path / "src.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    model = io.load_model(src)
    assert not isinstance(model.graph.initializers["w"].const_value, ir.ExternalTensor)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    io.save_model(model, out, external_data=True)
    tensor = model.graph.initializers["w"].const_value
    assert isinstance(tensor, ir.ExternalTensor) and Path(tensor.path) == out.parent / "m.onnx.data"
    np.testing.assert_array_equal(tensor.numpy(), w)
    again = tmp_path / "again.onnx"
    io.save_model(model, again, external_data=False)
    np.testing.assert_array_equal(numpy_helper.to_array(onnx.load(str(again)).graph.initializer[0]), w)
