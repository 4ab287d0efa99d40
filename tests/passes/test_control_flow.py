"""Weights inside If/Loop bodies are weights: fold frees loop-carried ones, weight_only compresses them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import io, runtime, serialize
from graphopt.passes import edit
from graphopt.passes.fold.constants import FoldConstantsPass
from graphopt.passes.prune.config import PruneConfig
from graphopt.passes.prune.unstructured import PruneWeightsPass
from graphopt.passes.weight_only import WeightOnlyConfig, WeightOnlyQuantizePass
from tests import toy


def _body_ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.graph is not model.graph]


def _outputs(model: ir.Model | Path, x: np.ndarray) -> np.ndarray:
    return runtime.create_session(model, optimization="disable").run(None, {"x": x})[0]


def test_fold_turns_a_loop_carried_weight_into_an_outer_read(tmp_path: Path) -> None:
    path = toy.save(toy.loop_carried_weight(), tmp_path / "loop.onnx")
    model = io.load_model(path)
    assert FoldConstantsPass()(model).modified
    serialize.check_model(model)
    loop = next(n for n in model.graph if n.op_type == "Loop")
    assert len(loop.inputs) == 3 and len(loop.outputs) == 1  # M, cond, h: the weight is no longer carried
    matmul = next(n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == "MatMul")
    assert matmul.inputs[1].const_value is not None  # the body reads the weight from the main graph
    x = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
    np.testing.assert_allclose(_outputs(model, x), _outputs(path, x), rtol=1e-5, atol=1e-6)


def test_a_carried_value_the_body_changes_stays_carried(tmp_path: Path) -> None:
    proto = toy.loop_carried_weight()
    body = proto.graph.node[1].attribute[0].g
    body.node[3].CopyFrom(helper.make_node("Neg", ["w_in"], ["w_out"]))  # the weight now changes each step
    path = toy.save(proto, tmp_path / "loop.onnx")
    model = io.load_model(path)
    FoldConstantsPass()(model)
    loop = next(n for n in model.graph if n.op_type == "Loop")
    assert len(loop.inputs) == 4
    x = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    np.testing.assert_allclose(_outputs(model, x), _outputs(path, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", ["matmul_nbits", "qdq"])
def test_weight_only_compresses_a_weight_read_inside_a_loop(tmp_path: Path, fmt: str) -> None:
    path = toy.save(toy.loop_carried_weight(), tmp_path / "loop.onnx")
    model = io.load_model(path)
    edit.lift_constant_weights(model)  # what the pipeline does before any lossy pass
    result = WeightOnlyQuantizePass(WeightOnlyConfig(format=fmt, bits=8, block_size=16))(model)  # type: ignore[arg-type]
    assert result.modified
    assert "MatMul" not in _body_ops(model) or "DequantizeLinear" in _body_ops(model)
    saved = io.save_model(model, tmp_path / "out.onnx")  # checker and ORT load
    x = np.random.default_rng(2).standard_normal((4, 32)).astype(np.float32)
    want, got = _outputs(path, x), _outputs(saved.path, x)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02


def test_weight_only_compresses_a_weight_read_inside_an_if_branch(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array((rng.standard_normal((32, 16)) / 6).astype(np.float32), "w")

    def branch(name: str, op: str) -> onnx.GraphProto:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node(op, ["mm"], ["out"])]
        return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 16])])

    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"]),
            helper.make_node(
                "If", ["cond"], ["y"], then_branch=branch("then", "Relu"), else_branch=branch("else", "Tanh")
            ),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])],
        [weight, numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = toy.save(proto, tmp_path / "if.onnx")
    model = io.load_model(path)
    assert WeightOnlyQuantizePass(WeightOnlyConfig(bits=8, block_size=16))(model).modified
    assert "MatMul" not in _body_ops(model)  # both branches read the same quantized weight
    saved = io.save_model(model, tmp_path / "out.onnx")
    for sign in (1.0, -1.0):
        x = (sign * np.abs(rng.standard_normal((3, 32)))).astype(np.float32)
        want, got = _outputs(path, x), _outputs(saved.path, x)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02


def test_prune_reaches_a_weight_read_inside_a_loop(tmp_path: Path) -> None:
    path = toy.save(toy.loop_carried_weight(), tmp_path / "loop.onnx")
    model = io.load_model(path)
    edit.lift_constant_weights(model)
    assert PruneWeightsPass(PruneConfig(pattern="n:m"))(model).modified
    matmul = next(n for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == "MatMul")
    weight = matmul.inputs[1].const_value.numpy()
    assert (weight == 0).mean() == 0.5  # 2 of every 4 along K
    io.save_model(model, tmp_path / "out.onnx")


def test_fp16_gives_a_body_reading_an_outer_value_a_float32_copy(tmp_path: Path) -> None:
    """The branches read h, computed in the main graph (converted to float16); they stay float32 and read a copy."""
    from graphopt.passes.fp16 import Float16Pass, Fp16Config

    rng = np.random.default_rng(4)
    weight = numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "w")

    def branch(name: str, op: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node(op, ["h"], ["out"])],
            name,
            [],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 8])],
        )

    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"]),
            helper.make_node(
                "If", ["cond"], ["y"], then_branch=branch("then", "Relu"), else_branch=branch("else", "Neg")
            ),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        [weight, numpy_helper.from_array(np.array(0.0, np.float32), "zero")],
    )
    path = toy.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "if.onnx"
    )
    model = io.load_model(path)
    assert Float16Pass(Fp16Config())(model).modified
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    assert matmul.outputs[0].dtype == ir.DataType.FLOAT16  # the main graph is float16
    saved = io.save_model(model, tmp_path / "out.onnx")  # ORT refused the float16 value in a float32 body before
    for sign in (1.0, -1.0):
        x = (sign * np.abs(rng.standard_normal((3, 8)))).astype(np.float32)
        np.testing.assert_allclose(_outputs(saved.path, x), _outputs(path, x), rtol=1e-2, atol=1e-2)
