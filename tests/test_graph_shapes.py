"""Graph shapes every pass must survive: outputs that are inputs or initializers, duplicate node names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import io, registry, runtime
from tests import toy

# Every registered pass, so a new one is covered the day it is registered; options only where
# the defaults would leave this tiny model untouched.
OPTIONS = {"prune": "prune:sparsity=0.5", "prune_structured": "prune_structured:ratio=0.5,recover=false"}
NEEDS_FILES = {"unmerge_lora": "needs the adapter folders that were merged"}
PIPELINES = [
    pytest.param(
        [OPTIONS.get(name, name)], id=name, marks=[pytest.mark.skip(NEEDS_FILES[name])] if name in NEEDS_FILES else []
    )
    for name in registry.REGISTRY
]


def _odd_model(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="same"),
            helper.make_node("Relu", ["h"], ["y"], name="same"),  # duplicate node name
        ],
        "odd",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64]),  # an input as output
            helper.make_tensor_value_info("C", TensorProto.FLOAT, [4]),  # an initializer as output
        ],
        [
            numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W"),
            numpy_helper.from_array(np.arange(4, dtype=np.float32), "C"),
        ],
    )
    return toy.save(toy._model(graph), tmp_path / "odd.onnx")


@pytest.mark.parametrize("passes", PIPELINES)
def test_odd_graphs_keep_their_outputs(tmp_path: Path, passes: list[str]) -> None:
    path = _odd_model(tmp_path)
    recipe = {"passes": passes, "verify": {"latency_runs": 0, "report_only": True, "dims": {"batch": 2}}}
    result = graphopt.optimize(path, recipe)
    assert [v.name for v in result.model.graph.outputs] == ["y", "x", "C"]
    saved = io.save_model(result.model, tmp_path / "out.onnx")
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    outputs = runtime.run(runtime.create_session(saved.path), {"x": x})
    np.testing.assert_array_equal(outputs["x"], x)
    np.testing.assert_array_equal(outputs["C"], np.arange(4, dtype=np.float32))
