from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import io, recipe, runtime, serialize
from graphopt.calibration.magnitudes import collect_magnitudes
from graphopt.calibration.sources import DataSpec
from graphopt.errors import RecipeError
from graphopt.passes.fold.constants import FoldConstantsPass
from graphopt.passes.fp16 import Float16Pass, Fp16Config
from tests import toy

DATA = Path(str(resources.files("graphopt") / "data"))


def _cnn() -> ir.Model:
    model = io.load_model(DATA / "digits_cnn.onnx")
    FoldConstantsPass()(model)
    return model


def test_cnn_in_fp16_matches_fp32_and_halves_weights() -> None:
    reference, model = _cnn(), _cnn()
    assert Float16Pass(Fp16Config())(model).modified
    serialize.check_model(model)
    assert serialize.model_bytes(model) < 0.51 * serialize.model_bytes(reference)
    assert [v.dtype for v in [*model.graph.inputs, *model.graph.outputs]] == [ir.DataType.FLOAT, ir.DataType.FLOAT]
    x = np.load(DATA / "digits_test.npz")["input"][:32]
    expected = runtime.run(runtime.create_session(reference), {"input": x})["logits"]
    got = runtime.run(runtime.create_session(model), {"input": x})["logits"]
    np.testing.assert_allclose(got, expected, atol=2e-2 * np.abs(expected).max())
    assert not Float16Pass(Fp16Config())(model).modified  # second run: already float16


def test_blocked_ops_and_io_types() -> None:
    model = _cnn()
    Float16Pass(Fp16Config(keep_io_types=False, exclude_op_types=("Gemm",)))(model)
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT16
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    assert all(v.dtype == ir.DataType.FLOAT for v in gemm.inputs if v is not None)


def test_values_beyond_fp16_range_stay_float32(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "big"], ["h"], name="scale_up"),
            helper.make_node("Div", ["h", "big"], ["y"], name="scale_down"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array(1e6, np.float32), "big")],
    )
    model = io.load_model(toy.save(toy._model(graph), tmp_path / "big.onnx"))
    magnitudes = collect_magnitudes(model, DataSpec(samples=4, dims={"batch": 2}), Fp16Config())
    assert magnitudes is not None and magnitudes["h"] > 1e5
    assert not Float16Pass(Fp16Config(), magnitudes)(model).modified
    x = np.full((2, 4), 3.0, np.float32)
    np.testing.assert_allclose(runtime.run(runtime.create_session(model), {"x": x})["y"], x)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"keep_io_types": "no"}, "keep_io_types: expected bool"), ({"exclude_op_types": "Softmax"}, "expected a list")],
)
def test_bad_configs(options: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        recipe.make_step("fp16", options, "recipe")


def test_constants_read_only_in_float32_stay_constants(tmp_path: Path) -> None:
    """An empty Resize `scales` behind a Cast is no longer empty to ORT (Paddle's SLANet export)."""
    empty = onnx.helper.make_tensor("e", onnx.TensorProto.FLOAT, [0], [])
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Relu", ["x"], ["r"]),
            onnx.helper.make_node("Constant", [], ["roi"], value=empty),
            onnx.helper.make_node("Constant", [], ["scales"], value=empty),
            onnx.helper.make_node("Shape", ["x"], ["shape"]),
            onnx.helper.make_node("Add", ["shape", "shape"], ["sizes"]),
            onnx.helper.make_node("Resize", ["r", "roi", "scales", "sizes"], ["y"]),
        ],
        "resize",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    path = toy.save(toy._model(graph), tmp_path / "resize.onnx")
    model = io.load_model(path)
    Float16Pass(Fp16Config())(model)
    saved = io.save_model(model, tmp_path / "out.onnx")
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    assert runtime.run(runtime.create_session(saved.path), {"x": x})["y"].shape == (2, 4, 8, 8)


def test_data_movement_at_the_edge_of_float16_stays_float32(tmp_path: Path) -> None:
    """A Transpose between a float16 Relu and a float32-only op (Softmax) stays float32: the Cast goes before it,
    one Cast either way. ONNX Runtime 1.31 crashed on the float16 Transpose before a Cast into a float32 GRU."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Transpose", ["r"], ["t"], perm=[1, 0]),
            helper.make_node("Softmax", ["t"], ["y"], axis=-1),
        ],
        "edge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 4])],
        [numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w")],
    )
    model = io.load_model(toy.save(toy._model(graph), tmp_path / "edge.onnx"))
    reference = model.clone()
    fp16 = Float16Pass(Fp16Config())
    assert fp16(model).modified
    types = {n.op_type: n.outputs[0].dtype for n in model.graph if n.op_type != "Cast"}
    assert types == {
        "MatMul": ir.DataType.FLOAT16, "Relu": ir.DataType.FLOAT16,
        "Transpose": ir.DataType.FLOAT, "Softmax": ir.DataType.FLOAT,
    }  # fmt: skip
    assert fp16.details["casts"] == 2 and fp16.details["movement_kept_float32"] == 1
    x = rng.standard_normal((4, 8)).astype(np.float32)
    want = runtime.run(runtime.create_session(reference), {"x": x})["y"]
    got = runtime.run(runtime.create_session(model), {"x": x})["y"]
    np.testing.assert_allclose(got, want, atol=2e-3)
