"""Pruned weights on disk: ``graphopt.io.save_model(sparse=...)`` and loading them back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import io, runtime
from graphopt.errors import ModelSaveError
from graphopt.passes.prune.unstructured import PruneConfig, PruneWeightsPass
from tests import toy


def _mlp(tmp_path: Path, sparsity: float, pattern: str = "unstructured") -> ir.Model:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["a"]),
            helper.make_node("Relu", ["a"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [
            numpy_helper.from_array(rng.standard_normal((64, 128)).astype(np.float32), "W1"),
            numpy_helper.from_array(rng.standard_normal(128).astype(np.float32), "b1"),
            numpy_helper.from_array(rng.standard_normal((128, 32)).astype(np.float32), "W2"),
        ],
    )
    model = io.load_model(toy.save(toy._model(graph), tmp_path / "dense.onnx"))
    PruneWeightsPass(PruneConfig(pattern=pattern, sparsity=sparsity))(model)  # type: ignore[arg-type]
    return model


def _outputs(model: ir.Model | Path) -> np.ndarray:
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    return runtime.run(runtime.create_session(model), {"x": x})["y"]


def test_sparse_weights_round_trip(tmp_path: Path) -> None:
    model = _mlp(tmp_path, 0.9)
    dense = io.save_model(model, tmp_path / "dense_out.onnx", sparse="never")
    sparse = io.save_model(model, tmp_path / "sparse_out.onnx")  # auto: 10% dense is smaller as COO
    assert (dense.sparse_initializers, sparse.sparse_initializers) == (0, 2)
    proto = onnx.load(str(sparse.path))
    assert sorted(s.values.name for s in proto.graph.sparse_initializer) == ["W1", "W2"]
    assert all(s.indices.data_type == TensorProto.INT64 for s in proto.graph.sparse_initializer)
    assert [t.name for t in proto.graph.initializer] == ["b1"]
    onnx.checker.check_model(proto)
    # 10% of 12288 weights at 4 + 8 bytes each, against 4 bytes for every weight.
    assert sparse.bytes_on_disk < 0.4 * dense.bytes_on_disk
    np.testing.assert_array_equal(_outputs(sparse.path), _outputs(model))  # ONNX Runtime densifies at load
    loaded = io.load_model(sparse.path)  # loading densifies too: nothing is lost
    for name in ("W1", "W2"):
        np.testing.assert_array_equal(
            loaded.graph.initializers[name].const_value.numpy(), model.graph.initializers[name].const_value.numpy()
        )


def test_auto_keeps_half_sparse_weights_dense(tmp_path: Path) -> None:
    model = _mlp(tmp_path, 0.5, pattern="n:m")
    auto = io.save_model(model, tmp_path / "auto.onnx")
    always = io.save_model(model, tmp_path / "always.onnx", sparse="always")
    assert auto.sparse_initializers == 0 and always.sparse_initializers == 2
    # With int64 indices, a 50%-dense float32 weight takes 1.5x its dense bytes.
    weights = (64 * 128 + 128 * 32) * 4
    assert always.bytes_on_disk - auto.bytes_on_disk == pytest.approx(0.5 * weights, rel=0.02)
    np.testing.assert_array_equal(_outputs(always.path), _outputs(auto.path))


def test_unpruned_and_quantized_weights_stay_dense(tmp_path: Path) -> None:
    model = _mlp(tmp_path, 0.0)
    table = np.ones((100, 8), np.float32)
    table[0] = 0.0  # an embedding's padding row: 1% zeros is not a pruned weight
    int8 = np.zeros((4, 4), np.int8)
    for name, array in (("table", table), ("q", int8)):
        model.graph.register_initializer(ir.Value(name=name, const_value=ir.tensor(array, name=name)))
    assert io.sparse_candidates(model, "always") == []
    PruneWeightsPass(PruneConfig(sparsity=0.1))(model)
    assert io.sparse_candidates(model, "always") == ["W1", "W2"] and io.sparse_candidates(model, "auto") == []


def test_external_data_and_bad_modes(tmp_path: Path) -> None:
    model = _mlp(tmp_path, 0.9)
    saved = io.save_model(model, tmp_path / "ext.onnx", external_data=True)
    assert saved.sparse_initializers == 0 and saved.data_path is not None
    with pytest.raises(ModelSaveError, match="sparse initializers are written inline"):
        io.save_model(model, tmp_path / "ext2.onnx", external_data=True, sparse="always")
    with pytest.raises(ModelSaveError, match="sparse='dense' is not one of 'never', 'auto', 'always'"):
        io.save_model(model, tmp_path / "bad.onnx", sparse="dense")  # type: ignore[arg-type]
