from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from graphopt import io, runtime
from graphopt.calibration.sources import DataSpec
from graphopt.calibration.timing import measure
from graphopt.passes.tune import TuneConfig, TuneDecision, TuneForRuntimePass, residual_adds
from tests import toy


def _residual_ln(tmp_path: Path) -> ir.Model:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["x", "h"], ["r"]),
            helper.make_node("LayerNormalization", ["r", "g", "b"], ["y"], axis=-1),
        ],
        "res",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 32])],
        [
            numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "W"),
            numpy_helper.from_array(np.ones(32, np.float32), "g"),
            numpy_helper.from_array(np.zeros(32, np.float32), "b"),
        ],
    )
    return io.load_model(toy.save(toy._model(graph), tmp_path / "res.onnx"))


def test_finds_adds_feeding_layernorm(tmp_path: Path) -> None:
    model = _residual_ln(tmp_path)
    assert [n.op_type for n in residual_adds(model.graph)] == ["Add"]
    assert residual_adds(io.load_model(toy.save(toy.foldable(), tmp_path / "f.onnx")).graph) == []


def test_applies_decision_exactly_and_only_once(tmp_path: Path) -> None:
    model = _residual_ln(tmp_path)
    reference = model.clone()
    result = TuneForRuntimePass(TuneConfig(), TuneDecision(True, {"as is": 2.0, "Add -> Sum": 1.0}))(model)
    assert result.modified and [n.op_type for n in model.graph] == ["MatMul", "Sum", "LayerNormalization"]
    x = np.random.default_rng(1).standard_normal((2, 4, 32)).astype(np.float32)
    expected = runtime.run(runtime.create_session(reference), {"x": x})["y"]
    # Equal up to float rounding: ORT computes the fused SkipLayerNormalization in another order.
    np.testing.assert_allclose(
        runtime.run(runtime.create_session(model), {"x": x})["y"], expected, rtol=1e-5, atol=1e-5
    )
    assert measure(model, DataSpec(samples=1), TuneConfig()).reason == "no Add -> LayerNormalization sites"


def test_slower_rewrite_is_not_applied(tmp_path: Path) -> None:
    model = _residual_ln(tmp_path)
    assert not TuneForRuntimePass(TuneConfig(), TuneDecision(False, {}))(model).modified
    assert [n.op_type for n in model.graph] == ["MatMul", "Add", "LayerNormalization"]


def test_measure_times_both_variants(tmp_path: Path) -> None:
    model = _residual_ln(tmp_path)
    decision = measure(model, DataSpec(samples=1, dims={"batch": 2}), TuneConfig(runs=3))
    assert set(decision.latency_ms) == {"as is", "Add -> Sum"} and decision.reason == "measured"
    assert [n.op_type for n in model.graph] == ["MatMul", "Add", "LayerNormalization"]  # measuring edits a copy
