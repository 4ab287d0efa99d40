"""A graph input with a default initializer stays an input through every pass: what a caller feeds is used."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import io
from graphopt.calibration.sources import DataSpec


def _model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "W")  # overridable default
    v = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "V")  # a plain weight
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"])]
    nodes.append(helper.make_node("MatMul", ["r", "V"], ["y"]))
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32]),
        helper.make_tensor_value_info("W", TensorProto.FLOAT, [32, 16]),
    ]
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w, v]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("spec", ["fold", "quantize", "weight_only:block_size=16", "fp16", "prune:pattern=n:m"])
def test_a_fed_value_still_reaches_the_graph(tmp_path: Path, spec: str) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    calib = DataSpec(source=[{"x": np.random.default_rng(1).standard_normal((16, 32)).astype(np.float32)}], samples=16)
    recipe = {"passes": [spec], "verify": {"report_only": True, "latency_runs": 0}}
    result = graphopt.optimize(path, recipe, calibration=calib)
    saved = io.save_model(result.model, tmp_path / "o.onnx")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns about every initializer that is also an input
    session = ort.InferenceSession(str(saved.path), options)
    assert [i.name for i in session.get_overridable_initializers()] == ["W"]  # the default is still there
    x = np.ones((2, 32), np.float32)
    zero = session.run(None, {"x": x, "W": np.zeros((32, 16), np.float32)})[0]
    np.testing.assert_array_equal(zero, np.zeros_like(zero))  # relu(x @ 0) @ V: the fed W was used
