"""fold's shape arithmetic, layout rules and dropped default inputs: exact, and only where exact.

Each graph is the form a real exporter wrote (torch's attention reshapes and RNN zero states,
YOLO's space-to-depth stem, ONNX LSTM's direction axis); each is checked at two batch sizes, so
a constant that froze a symbolic dimension would fail.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import io, runtime, serialize
from graphopt.passes.fold.constants import FoldConstantsPass
from tests import toy


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def _model(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _fold(tmp_path: Path, proto: onnx.ModelProto, feeds_list: list[dict[str, np.ndarray]]) -> ir.Model:
    path = toy.save(proto, tmp_path / "m.onnx")
    model = io.load_model(path)
    assert FoldConstantsPass()(model).modified
    serialize.check_model(model)
    before = runtime.create_session(path, optimization="disable")
    after = runtime.create_session(model, optimization="disable")
    for feeds in feeds_list:
        for want, got in zip(before.run(None, feeds), after.run(None, feeds), strict=True):
            np.testing.assert_array_equal(got, want)
    return model


def _out(name: str, rank: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [f"{name}{i}" for i in range(rank)])


def _bn_params(rng: np.random.Generator, channels: int) -> dict[str, np.ndarray]:
    """Scale, shift, mean and variance of a BatchNorm, named g, b, m, v."""
    values = (
        rng.uniform(0.5, 1.5, channels),
        rng.standard_normal(channels),
        rng.standard_normal(channels),
        rng.uniform(0.5, 2, channels),
    )
    return {name: v.astype(np.float32) for name, v in zip("gbmv", values, strict=True)}


def _fold_close(tmp_path: Path, proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> ir.Model:
    """Fold, then compare with the input to float rounding (weights were rescaled)."""
    path = toy.save(proto, tmp_path / "m.onnx")
    model = io.load_model(path)
    FoldConstantsPass()(model)
    want = runtime.create_session(path, optimization="disable").run(None, feeds)[0]
    got = runtime.create_session(model, optimization="disable").run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    return model


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def _attention_reshape(index_kind: str) -> onnx.ModelProto:
    """x[B, S, 8] -> Reshape to [B, S, 2, 4], the target read from Shape(x) as torch exports it."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"])]
    pieces = []
    for axis in (0, 1):
        if index_kind == "scalar":  # Gather with a scalar index, then Unsqueeze (torch.onnx)
            nodes += [
                helper.make_node("Gather", ["shape", f"i{axis}"], [f"d{axis}"], axis=0),
                helper.make_node("Unsqueeze", [f"d{axis}", "zero"], [f"u{axis}"]),
            ]
            pieces.append(f"u{axis}")
        else:  # Slice of the shape vector (dynamo)
            nodes.append(helper.make_node("Slice", ["shape", f"s{axis}", f"e{axis}"], [f"u{axis}"]))
            pieces.append(f"u{axis}")
    nodes += [
        helper.make_node("Concat", [*pieces, "heads"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "i0"),
        numpy_helper.from_array(np.array(1, np.int64), "i1"),
        _ints("zero", [0]),
        _ints("s0", [0]),
        _ints("e0", [1]),
        _ints("s1", [1]),
        _ints("e1", [2]),
        _ints("heads", [2, 4]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8])
    return _model(nodes, [x], [_out("y", 4)], inits)


@pytest.mark.parametrize("index_kind", ["scalar", "slice"])
def test_a_reshape_target_read_from_symbolic_dims_becomes_a_constant(tmp_path: Path, index_kind: str) -> None:
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for shape in ((1, 3, 8), (4, 5, 8))]
    model = _fold(tmp_path, _attention_reshape(index_kind), feeds)
    assert _ops(model) == ["Reshape"]
    target = model.graph.node(0).inputs[1].const_value.numpy().tolist()
    assert target == [0, 0, 2, 4]  # both symbolic dims copied from the input, not frozen


def test_static_dims_read_from_a_shape_become_constants(tmp_path: Path) -> None:
    """Gather(Shape(x), 1) with a scalar index on a static dim: onnxscript only takes 1-D indices."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "i1"], ["d1"], axis=0),
        helper.make_node("Cast", ["d1"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "f"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(1, np.int64), "i1")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 6])
    feeds = [{"x": np.ones((n, 6), np.float32)} for n in (1, 3)]
    model = _fold(tmp_path, _model(nodes, [x], [_out("y", 2)], inits), feeds)
    assert _ops(model) == ["Mul"]


def test_a_dim_that_differs_from_the_input_is_not_copied(tmp_path: Path) -> None:
    """Reshape(z, [B*S, 8]) reads a product: one unknown becomes -1, never a 0 that copies z's dim."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "i0"], ["b"], axis=0),
        helper.make_node("Gather", ["shape", "i1"], ["s"], axis=0),
        helper.make_node("Mul", ["b", "s"], ["bs"]),
        helper.make_node("Unsqueeze", ["bs", "zero"], ["u"]),
        helper.make_node("Concat", ["u", "eight"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "i0"),
        numpy_helper.from_array(np.array(1, np.int64), "i1"),
        _ints("zero", [0]),
        _ints("eight", [8]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8])
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for shape in ((1, 3, 8), (2, 5, 8))]
    model = _fold(tmp_path, _model(nodes, [x], [_out("y", 2)], inits), feeds)
    assert _ops(model) == ["Reshape"]
    assert model.graph.node(0).inputs[1].const_value.numpy().tolist() == [-1, 8]


def _lstm(state_from_shape: bool) -> onnx.ModelProto:
    hidden, features = 3, 4
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, features)).astype(np.float32), "W")
    r = numpy_helper.from_array(rng.standard_normal((1, 4 * hidden, hidden)).astype(np.float32), "R")
    inits = [w, r, _ints("i1", [1]), _ints("e2", [2]), _ints("one", [1]), _ints("h", [hidden])]
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "i1", "e2"], ["batch"]),
        helper.make_node("Concat", ["one", "batch", "h"], ["state_shape"], axis=0),
    ]
    if state_from_shape:
        nodes.append(helper.make_node("ConstantOfShape", ["state_shape"], ["h0"]))
    else:  # a state of ones is not the default: it must stay
        one = helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])
        nodes.append(helper.make_node("ConstantOfShape", ["state_shape"], ["h0"], value=one))
    nodes.append(helper.make_node("LSTM", ["x", "W", "R", "", "", "h0", "h0"], ["y"], hidden_size=hidden))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", features])
    return _model(nodes, [x], [_out("y", 4)], inits)


@pytest.mark.parametrize("zeros", [True, False])
def test_an_rnn_zero_initial_state_is_dropped(tmp_path: Path, zeros: bool) -> None:
    rng = np.random.default_rng(3)
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for shape in ((5, 1, 4), (2, 3, 4))]
    model = _fold(tmp_path, _lstm(zeros), feeds)
    lstm = next(n for n in model.graph if n.op_type == "LSTM")
    if zeros:
        assert _ops(model) == ["LSTM"]
        assert all(v is None for v in lstm.inputs[5:])
    else:  # the state's shape still comes from x: the Slice chain is folded into a Reshape-free form
        assert lstm.inputs[5] is not None and lstm.inputs[6] is not None


def test_slice_of_slice_on_other_axes_is_one_slice(tmp_path: Path) -> None:
    nodes = [
        helper.make_node("Slice", ["x", "s0", "e0", "a2", "st2"], ["half"]),
        helper.make_node("Slice", ["half", "s0", "e0", "a3", "st2"], ["y"]),
        helper.make_node("Slice", ["half", "s1", "e0", "a3", "st2"], ["z"]),
    ]
    big = 2**62
    inits = [
        _ints("s0", [0]),
        _ints("s1", [1]),
        _ints("e0", [big]),
        _ints("a2", [2]),
        _ints("a3", [3]),
        _ints("st2", [2]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])
    outs = [_out(n, 4) for n in ("y", "z")]
    feeds = [{"x": np.random.default_rng(4).standard_normal((1, 3, 8, 8)).astype(np.float32)}]
    model = _fold(tmp_path, _model(nodes, [x], outs, inits), feeds)
    assert _ops(model) == ["Slice", "Slice"]
    assert all(n.inputs[0].name == "x" for n in model.graph)


@pytest.mark.parametrize(("perm", "folds"), [((0, 2, 1, 3), True), ((2, 0, 1, 3), False)])
def test_a_transpose_of_size_one_axes_before_a_reshape_is_dropped(tmp_path: Path, perm: tuple, folds: bool) -> None:
    """[T, 1, B, H] -> [T, B, 1, H] keeps the element order; moving T past B does not."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=list(perm)),
        helper.make_node("Reshape", ["t", "target"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, "B", 6])
    y = _out("y", 3)
    feeds = [{"x": np.random.default_rng(5).standard_normal((5, 1, b, 6)).astype(np.float32)} for b in (1, 2)]
    proto = _model(nodes, [x], [y], [_ints("target", [5, -1, 6])])
    if folds:
        assert _ops(_fold(tmp_path, proto, feeds)) == ["Reshape"]
    else:
        model = io.load_model(toy.save(proto, tmp_path / "m.onnx"))
        FoldConstantsPass()(model)
        assert _ops(model) == ["Transpose", "Reshape"]


def test_a_small_constant_of_shape_is_folded_a_large_one_kept(tmp_path: Path) -> None:
    nodes = [
        helper.make_node(
            "ConstantOfShape", ["small_shape"], ["small"], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [2.0])
        ),
        helper.make_node("ConstantOfShape", ["big_shape"], ["big"]),
        helper.make_node("Mul", ["x", "small"], ["y"]),
        helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        helper.make_node("Add", ["y", "s"], ["z"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    z = _out("z", 1)
    inits = [_ints("small_shape", [3]), _ints("big_shape", [64, 1024])]
    feeds = [{"x": np.arange(3, dtype=np.float32)}]
    model = _fold(tmp_path, _model(nodes, [x], [z], inits), feeds)
    assert "ConstantOfShape" in _ops(model)  # the 64K fill stays a node (its fold would grow the file)
    assert _ops(model).count("ConstantOfShape") == 1


def test_batchnorm_with_small_constant_node_params_folds_into_conv(tmp_path: Path) -> None:
    """Paddle stores an 8-channel BatchNorm's parameters as Constant nodes below onnx_ir's lift size."""
    rng = np.random.default_rng(6)
    weights = {"w": rng.standard_normal((8, 3, 3, 3)).astype(np.float32), **_bn_params(rng, 8)}
    nodes = [helper.make_node("Constant", [], [n], value=numpy_helper.from_array(v)) for n, v in weights.items()]
    nodes += [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])
    feeds = {"x": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    assert _ops(_fold_close(tmp_path, _model(nodes, [x], [_out("y", 4)]), feeds)) == ["Conv"]


def test_a_reshape_back_to_the_input_shape_skips_both_reshapes(tmp_path: Path) -> None:
    """[6, S, 32] -> [1, 6, -1, 32] -> [-1, S, 32] (S read from the middle tensor) is the input itself."""
    nodes = [
        helper.make_node("Reshape", ["x", "split"], ["mid"]),
        helper.make_node("Shape", ["mid"], ["shape"]),
        helper.make_node("Slice", ["shape", "m2", "m1"], ["s"]),
        helper.make_node("Concat", ["m1", "s", "d32"], ["target"], axis=0),
        helper.make_node("Reshape", ["mid", "target"], ["back"]),
        helper.make_node("Relu", ["back"], ["y"]),
    ]
    inits = [_ints("split", [1, 6, -1, 32]), _ints("m2", [-2]), _ints("m1", [-1]), _ints("d32", [32])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, "S", 32])
    proto = _model(nodes, [x], [_out("y", 3)], inits)
    # As torch's dynamo exporter records it: the middle tensor's S is the input's S.
    proto.graph.value_info.append(helper.make_tensor_value_info("mid", TensorProto.FLOAT, [1, 6, "S", 32]))
    rng = np.random.default_rng(7)
    feeds = [{"x": rng.standard_normal((6, s, 32)).astype(np.float32)} for s in (1, 5)]
    model = _fold(tmp_path, proto, feeds)
    assert _ops(model) == ["Relu"]


@pytest.mark.parametrize(
    ("op", "value", "shape", "folds"),
    [
        ("Mul", 1.0, (1,), True),  # Paddle's swish: x * Sigmoid(x * [1.0])
        ("Add", 0.0, (4,), True),
        ("Div", 1.0, (1, 1), True),
        ("Sub", 0.0, (1,), True),
        ("Mul", 1.0, (2, 4), False),  # broadcasting grows x: not an identity
        ("Mul", 2.0, (1,), False),
    ],
)
def test_a_neutral_constant_operand_of_any_shape_is_an_identity(
    tmp_path: Path, op: str, value: float, shape: tuple, folds: bool
) -> None:
    nodes = [helper.make_node(op, ["x", "c"], ["t"]), helper.make_node("Relu", ["t"], ["y"])]
    inits = [numpy_helper.from_array(np.full(shape, value, np.float32), "c")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    proto = _model(nodes, [x], [_out("y", 2)], inits)
    model = io.load_model(toy.save(proto, tmp_path / "m.onnx"))
    FoldConstantsPass()(model)
    assert _ops(model) == (["Relu"] if folds else [op, "Relu"])


def test_a_channel_bias_after_a_conv_transpose_goes_into_it(tmp_path: Path) -> None:
    """Paddle writes ConvTranspose + Add([1, C, 1, 1]) + BatchNorm: all three become one ConvTranspose."""
    rng = np.random.default_rng(8)
    weights = {
        "w": rng.standard_normal((4, 6, 2, 2)).astype(np.float32),
        "bias": rng.standard_normal((1, 6, 1, 1)).astype(np.float32),
        **_bn_params(rng, 6),
    }
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["c"], strides=[2, 2]),
        helper.make_node("Add", ["c", "bias"], ["a"]),
        helper.make_node("BatchNormalization", ["a", "g", "b", "m", "v"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])
    proto = _model(nodes, [x], [_out("y", 4)], [numpy_helper.from_array(v, n) for n, v in weights.items()])
    feeds = {"x": rng.standard_normal((2, 4, 5, 5)).astype(np.float32)}
    assert _ops(_fold_close(tmp_path, proto, feeds)) == ["ConvTranspose"]
