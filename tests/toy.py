"""Small hand-built ONNX models for unit tests (tests may use protobuf; the library may not)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 18


def _model(graph: onnx.GraphProto, opset: int = OPSET, **kwargs: object) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)
    model.ir_version = 10
    return model


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def foldable(seed: int = 0) -> onnx.ModelProto:
    """y = Relu(x @ Transpose(W) + (c1 + c2)) with an Identity: three things to fold."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"]),
        helper.make_node("MatMul", ["x", "Wt"], ["m"]),
        helper.make_node("Add", ["c1", "c2"], ["c"]),
        helper.make_node("Add", ["m", "c"], ["a"]),
        helper.make_node("Identity", ["a"], ["i"]),
        helper.make_node("Relu", ["i"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "foldable",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [
            _init("W", rng.standard_normal((4, 8)).astype(np.float32)),
            _init("c1", rng.standard_normal(4).astype(np.float32)),
            _init("c2", rng.standard_normal(4).astype(np.float32)),
        ],
    )
    return _model(graph)


def already_folded() -> onnx.ModelProto:
    """y = Relu(x @ W + b): nothing for fold to do."""
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["m"]),
            helper.make_node("Add", ["m", "b"], ["a"]),
            helper.make_node("Relu", ["a"], ["y"]),
        ],
        "folded",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [
            _init("W", rng.standard_normal((8, 4)).astype(np.float32)),
            _init("b", rng.standard_normal(4).astype(np.float32)),
        ],
    )
    return _model(graph)


def conv_bn() -> onnx.ModelProto:
    """Conv -> BatchNormalization -> Relu, as exporters leave it in eval mode."""
    rng = np.random.default_rng(2)
    c = 6
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W", "B"], ["conv"], pads=[1, 1, 1, 1]),
            helper.make_node("BatchNormalization", ["conv", "scale", "bias", "mean", "var"], ["bn"], epsilon=1e-5),
            helper.make_node("Relu", ["bn"], ["y"]),
        ],
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", c, 8, 8])],
        [
            _init("W", rng.standard_normal((c, 3, 3, 3)).astype(np.float32)),
            _init("B", rng.standard_normal(c).astype(np.float32)),
            _init("scale", rng.uniform(0.5, 1.5, c).astype(np.float32)),
            _init("bias", rng.standard_normal(c).astype(np.float32)),
            _init("mean", rng.standard_normal(c).astype(np.float32)),
            _init("var", rng.uniform(0.5, 2.0, c).astype(np.float32)),
        ],
    )
    return _model(graph)


def qdq_weight() -> onnx.ModelProto:
    """A QAT-style constant weight Q -> DQ -> MatMul: fold must keep the pair."""
    rng = np.random.default_rng(3)
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["W", "s", "z"], ["Wq"]),
            helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["Wd"]),
            helper.make_node("MatMul", ["x", "Wd"], ["y"]),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [
            _init("W", rng.standard_normal((8, 4)).astype(np.float32)),
            _init("s", np.array(0.02, dtype=np.float32)),
            _init("z", np.array(0, dtype=np.int8)),
        ],
    )
    return _model(graph)


def with_if_subgraph() -> onnx.ModelProto:
    """An If whose branches hold foldable constant arithmetic."""

    def branch(name: str, value: float) -> onnx.GraphProto:
        return helper.make_graph(
            [
                helper.make_node("Add", ["k1", "k2"], ["k"]),
                helper.make_node("Mul", ["x", "k"], ["out"]),
            ],
            name,
            [],
            [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])],
            [_init("k1", np.full(4, value, np.float32)), _init("k2", np.full(4, 1.0, np.float32))],
        )

    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Greater", ["s", "zero"], ["cond"]),
            helper.make_node("If", ["cond"], ["y"], then_branch=branch("then", 2.0), else_branch=branch("else", -3.0)),
        ],
        "if_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [_init("zero", np.array(0.0, np.float32))],
    )
    return _model(graph)


def loop_carried_weight(k: int = 32, n: int = 32, steps: int = 3, seed: int = 0) -> onnx.ModelProto:
    """A Loop that carries its weight through unchanged, as paddle2onnx exports a decoder.

    State ``h`` goes ``h <- tanh(h @ W)`` for ``steps`` iterations; ``W`` is a Constant node in
    the main graph passed in as loop-carried state and returned as is by the body.
    """
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "w_in"], ["hw"]),
            helper.make_node("Tanh", ["hw"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["w_in"], ["w_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["batch", k]),
            helper.make_tensor_value_info("w_in", TensorProto.FLOAT, [k, n]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["batch", n]),
            helper.make_tensor_value_info("w_out", TensorProto.FLOAT, [k, n]),
        ],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight)),
            helper.make_node("Loop", ["steps", "cond", "x", "w"], ["y", "w_final"], body=body),
        ],
        "loop_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [_init("steps", np.array(steps, np.int64)), _init("cond", np.array(True))],
    )
    return _model(graph)


def with_function() -> onnx.ModelProto:
    """A model-local function (y = x * (2 + 3)) called from the main graph."""
    function = helper.make_function(
        "local",
        "Scale5",
        ["inp"],
        ["out"],
        [
            helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0, np.float32))),
            helper.make_node("Constant", [], ["three"], value=numpy_helper.from_array(np.array(3.0, np.float32))),
            helper.make_node("Add", ["two", "three"], ["five"]),
            helper.make_node("Mul", ["inp", "five"], ["out"]),
        ],
        [helper.make_opsetid("", OPSET)],
    )
    graph = helper.make_graph(
        [helper.make_node("Scale5", ["x"], ["y"], domain="local")],
        "fn_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("local", 1)], functions=[function]
    )
    model.ir_version = 10
    return model


def shared_weight(size: int = 128) -> onnx.ModelProto:
    """One large weight read by a Transpose and a MatMul: folding must not duplicate it."""
    rng = np.random.default_rng(4)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["a"]),
            helper.make_node("Transpose", ["W"], ["Wt"]),
            helper.make_node("MatMul", ["a", "Wt"], ["y"]),
        ],
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size])],
        [_init("W", rng.standard_normal((size, size)).astype(np.float32) / size)],
    )
    return _model(graph)


def relu_mlp(k: int = 16, hidden: int = 32, n: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x[batch, k] -> MatMul fc1 -> Relu -> MatMul fc2 -> y[batch, n], random normal weights."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [
            _init("W1", rng.standard_normal((k, hidden)).astype(np.float32)),
            _init("W2", rng.standard_normal((hidden, n)).astype(np.float32)),
        ],
    )
    return _model(graph)


def matmul_chain(weights: list[np.ndarray]) -> onnx.ModelProto:
    """x @ W0 @ W1 @ ...: MatMuls of the given weights in a row, named fc0, fc1, ..."""
    nodes = [
        helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"W{i}"], [f"h{i + 1}"], name=f"fc{i}")
        for i in range(len(weights))
    ]
    nodes[-1].output[0] = "y"
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", weights[0].shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", weights[-1].shape[1]])],
        [_init(f"W{i}", w.astype(np.float32)) for i, w in enumerate(weights)],
    )
    return _model(graph)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path
