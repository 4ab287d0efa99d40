"""Random small graphs through fold keep their outputs (hypothesis)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphopt import io, runtime, serialize
from graphopt.passes.fold.constants import FoldConstantsPass
from tests import toy

UNARY = ("Relu", "Neg", "Abs", "Identity", "Sigmoid")
BINARY = ("Add", "Sub", "Mul", "Max", "Min")


@st.composite
def graphs(draw: st.DrawFn) -> tuple[list[tuple[str, bool]], int]:
    """A chain of ops on x; some binary ops take a constant subexpression that fold can fold."""
    ops = draw(st.lists(st.tuples(st.sampled_from(UNARY + BINARY), st.booleans()), min_size=1, max_size=8))
    return ops, draw(st.integers(0, 2**16))


def _build(ops: list[tuple[str, bool]], seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i, (op, constant_subexpr) in enumerate(ops):
        out = f"v{i}"
        if op in BINARY:
            c = f"c{i}"
            inits.append(numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), c))
            if constant_subexpr:  # (c + c) * c: all constant, fold must compute it
                nodes += [helper.make_node("Add", [c, c], [f"{c}a"]), helper.make_node("Mul", [f"{c}a", c], [f"{c}m"])]
                c = f"{c}m"
            nodes.append(helper.make_node(op, [current, c], [out]))
        else:
            nodes.append(helper.make_node(op, [current], [out]))
        current = out
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "random",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    return toy._model(graph)


@settings(max_examples=30, deadline=None)
@given(graphs())
def test_fold_keeps_outputs_of_random_graphs(spec: tuple[list[tuple[str, bool]], int]) -> None:
    ops, seed = spec
    with tempfile.TemporaryDirectory() as tmp:
        path = toy.save(_build(ops, seed), Path(tmp) / "m.onnx")
        reference, model = io.load_model(path), io.load_model(path)
    FoldConstantsPass()(model)
    serialize.check_model(model)
    x = np.random.default_rng(seed).standard_normal((3, 4)).astype(np.float32)
    expected = runtime.run(runtime.create_session(reference, optimization="disable"), {"x": x})["y"]
    got = runtime.run(runtime.create_session(model, optimization="disable"), {"x": x})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert not any(n.op_type == "Identity" for n in model.graph if n.outputs[0].name != "y")
