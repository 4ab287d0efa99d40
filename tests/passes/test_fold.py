from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from graphopt import io, recipe, runtime, serialize
from graphopt.errors import RecipeError
from graphopt.passes.fold.constants import FoldConfig, FoldConstantsPass
from tests import toy


def _load(proto: onnx.ModelProto, tmp_path: Path, name: str = "m.onnx") -> ir.Model:
    return io.load_model(toy.save(proto, tmp_path / name))


def _outputs(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return runtime.run(runtime.create_session(model, optimization="disable"), feeds)


def _fold_and_compare(tmp_path: Path, proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> ir.Model:
    reference = _load(proto, tmp_path)
    model = _load(proto, tmp_path, "m2.onnx")
    result = FoldConstantsPass()(model)
    assert result.modified
    serialize.check_model(model)
    expected, got = _outputs(reference, feeds), _outputs(model, feeds)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6)
    return model


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def test_folds_constant_subgraphs_and_identity(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    model = _fold_and_compare(tmp_path, toy.foldable(), {"x": x})
    assert _ops(model) == ["MatMul", "Add", "Relu"]
    assert [v.name for v in model.graph.inputs] == ["x"]
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_second_run_reports_unmodified(tmp_path: Path) -> None:
    model = _load(toy.foldable(), tmp_path)
    assert FoldConstantsPass()(model).modified
    assert not FoldConstantsPass()(model).modified


def test_nothing_to_fold_is_unmodified(tmp_path: Path) -> None:
    model = _load(toy.already_folded(), tmp_path)
    assert not FoldConstantsPass()(model).modified
    assert _ops(model) == ["MatMul", "Add", "Relu"]


def test_batchnorm_folds_into_conv(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    model = _fold_and_compare(tmp_path, toy.conv_bn(), {"x": x})
    assert _ops(model) == ["Conv", "Relu"]


def test_qdq_pairs_are_kept(tmp_path: Path) -> None:
    model = _load(toy.qdq_weight(), tmp_path)
    FoldConstantsPass()(model)
    assert _ops(model) == ["QuantizeLinear", "DequantizeLinear", "MatMul"]


def test_if_branches_are_folded(tmp_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((2, 4)).astype(np.float32)
    model = _fold_and_compare(tmp_path, toy.with_if_subgraph(), {"x": x})
    if_node = next(n for n in model.graph if n.op_type == "If")
    for branch in ("then_branch", "else_branch"):
        assert [n.op_type for n in if_node.attributes[branch].as_graph()] == ["Mul"]


def test_functions_are_inlined_and_folded(tmp_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)
    model = _fold_and_compare(tmp_path, toy.with_function(), {"x": x})
    assert _ops(model) == ["Mul"]
    assert not model.functions


def test_functions_folded_in_place_without_inlining(tmp_path: Path) -> None:
    model = _load(toy.with_function(), tmp_path)
    FoldConstantsPass(FoldConfig(inline_functions=False))(model)
    assert _ops(model) == ["Scale5"]
    assert len(model.functions) == 1


def test_shared_weight_is_not_duplicated(tmp_path: Path) -> None:
    model = _load(toy.shared_weight(), tmp_path)
    before = serialize.model_bytes(model)
    FoldConstantsPass()(model)
    assert serialize.model_bytes(model) <= before


def test_size_limit_keeps_large_folds_out(tmp_path: Path) -> None:
    model = _load(toy.foldable(), tmp_path)
    FoldConstantsPass(FoldConfig(size_limit=8))(model)
    assert "Transpose" in _ops(model)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"iterations": "two"}, "iterations: expected int; got 'two' (str)"),
        ({"size_limit": 1.5}, "size_limit: expected int; got 1.5 (float)"),
        ({"inline_functions": "yes"}, "inline_functions: expected bool; got 'yes' (str)"),
        ({"bogus": 1}, "unknown key(s) 'bogus'; valid keys: size_limit, iterations, inline_functions, shape_inference"),
        ({"iterations": 0}, "iterations must be at least 1"),
    ],
)
def test_bad_configs(options: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe.make_step("fold", options, "recipe")
    assert message in str(info.value)


def test_identity_between_two_graph_outputs_is_kept(tmp_path: Path) -> None:
    # onnx_ir's identity elimination would rename `a` to `b`, leaving outputs (b, b).
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Identity", ["a"], ["b"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, [3]),
        ],
    )
    model = _load(toy._model(graph), tmp_path)
    FoldConstantsPass()(model)
    assert [v.name for v in model.graph.outputs] == ["a", "b"]


def test_castlike_keeps_saturate(tmp_path: Path) -> None:
    # onnxscript turns CastLike into Cast and drops saturate=0; fold must not.
    from onnx import TensorProto, helper

    node = helper.make_node("CastLike", ["x", "like"], ["y"], saturate=0)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FN, [2])],
        [onnx.helper.make_tensor("like", TensorProto.FLOAT8E4M3FN, [1], [0.0])],
    )
    model = _load(toy._model(graph, opset=19), tmp_path)
    FoldConstantsPass()(model)
    kept = [n for n in model.graph if n.op_type in ("Cast", "CastLike")]
    assert kept and kept[0].attributes.get_int("saturate", 1) == 0
    assert all(n.domain == "" for n in model.graph) and "graphopt.shielded" not in model.opset_imports


def test_split_to_sequence_with_dynamic_split_does_not_crash(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("SplitToSequence", ["x", "s"], ["seq"], axis=1),
            helper.make_node("SequenceLength", ["seq"], ["n"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 6]),
            helper.make_tensor_value_info("s", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("n", TensorProto.INT64, [])],
    )
    model = _load(toy._model(graph), tmp_path)
    FoldConstantsPass()(model)
    assert [n.op_type for n in model.graph] == ["SplitToSequence", "SequenceLength"]


def test_compressed_constants_are_not_widened(tmp_path: Path) -> None:
    # float16 scales (as weight_only stores them) must not be folded into float32 copies.
    from onnx import TensorProto, helper, numpy_helper

    scales = np.random.default_rng(5).random((64, 64)).astype(np.float16)
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["s16"], ["s32"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["x", "s32"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(scales, "s16")],
    )
    model = _load(toy._model(graph), tmp_path)
    FoldConstantsPass()(model)
    assert [n.op_type for n in model.graph] == ["Cast", "MatMul"]


def test_a_body_output_that_names_an_outer_value_gets_an_identity() -> None:
    """ONNX Runtime refuses `If` branches that return an outer-scope value directly."""
    from graphopt.passes import edit

    model = ir.serde.deserialize_model(toy.with_if_subgraph())
    if_node = next(n for n in model.graph if n.op_type == "If")
    branch = if_node.attributes["then_branch"].value
    outer = next(n for n in model.graph if n.op_type == "ReduceSum").outputs[0]
    branch.outputs[0] = outer  # what a fold that drops the branch's last node can leave
    assert edit.guard_subgraph_outputs(model) == 1
    assert branch.outputs[0].producer().op_type == "Identity" and branch.outputs[0] is not outer
    assert edit.guard_subgraph_outputs(model) == 0
    serialize.check_model(model)


def test_fold_does_not_trust_a_declared_output_shape(tmp_path: Path) -> None:
    """An exporter's wrong output shape (ddddocr: [1, seqlen] for [T, 1, C] logits) must not steer a rewrite."""
    i64 = lambda name, values: helper.make_tensor(name, TensorProto.INT64, [len(values)], values)  # noqa: E731
    graph = helper.make_graph(
        [
            helper.make_node("Shape", ["x"], ["s"]),
            helper.make_node("Gather", ["s", "zero"], ["d0"], axis=0),
            helper.make_node("Gather", ["s", "one"], ["d1"], axis=0),
            helper.make_node("Concat", ["d0", "d1", "rest"], ["shape"], axis=0),
            helper.make_node("Reshape", ["x", "shape"], ["y"]),
        ],
        "declared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", 1, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seqlen"])],  # wrong, as exported
        [i64("zero", [0]), i64("one", [1]), i64("rest", [-1])],
    )
    path = toy.save(toy._model(graph, opset=12), tmp_path / "declared.onnx")
    model = io.load_model(path)
    FoldConstantsPass(FoldConfig())(model)
    x = np.arange(18, dtype=np.float32).reshape(3, 1, 6)
    got = runtime.run(runtime.create_session(model), {"x": x})["y"]
    assert got.shape == (3, 1, 6)
    assert [str(d) for d in model.graph.outputs[0].shape] == ["1", "seqlen"]  # the declaration itself stays
    assert all("allowzero" not in n.attributes for n in model.graph)  # opset 12 has no allowzero


@pytest.mark.parametrize(
    ("op", "shape", "folds"),
    [("Add", (1, 4, 1, 1), True), ("Mul", (4, 1, 1), True), ("Add", (1,), True), ("Add", (1, 4, 3, 3), False)],
)
def test_per_channel_constants_after_a_conv_go_into_it(tmp_path: Path, op: str, shape: tuple, folds: bool) -> None:
    """Paddle-style exports keep a Conv's bias or scale as a separate [1, C, 1, 1] Add/Mul."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node(op, ["c", "k"], ["y"])],
        "conv_affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 3, 3])],
        [
            onnx.numpy_helper.from_array(rng.standard_normal((4, 2, 3, 3)).astype(np.float32), "W"),
            onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "k"),
        ],
    )
    path = toy.save(toy._model(graph), tmp_path / "conv_affine.onnx")
    model = io.load_model(path)
    FoldConstantsPass(FoldConfig())(model)
    assert [n.op_type for n in model.graph] == (["Conv"] if folds else ["Conv", op])
    x = rng.standard_normal((2, 2, 3, 3)).astype(np.float32)
    want = runtime.run(runtime.create_session(path), {"x": x})["y"]
    np.testing.assert_allclose(runtime.run(runtime.create_session(model), {"x": x})["y"], want, rtol=1e-5, atol=1e-5)
