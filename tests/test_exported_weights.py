"""Weights as other people's exporters write them: read through Identity copies, tables holding -inf."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from tests import toy


def _reused_layer(path: Path) -> Path:
    """One layer applied twice, as torch exports a reused module: its weight once, an Identity per use."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    nodes = [
        helper.make_node("Identity", ["W"], ["W_a"], name="copy_a"),
        helper.make_node("Identity", ["W"], ["W_b"], name="copy_b"),
        helper.make_node("MatMul", ["x", "W_a"], ["h"], name="first"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W_b"], ["y"], name="second"),
    ]
    graph = helper.make_graph(
        nodes,
        "reused",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(w, "W")],
    )
    return toy.save(toy._model(graph), path)


def _float_bytes(model: graphopt.Result) -> int:
    return sum(
        v.const_value.nbytes
        for v in model.model.graph.initializers.values()
        if v.const_value is not None and v.const_value.dtype.name in ("FLOAT", "FLOAT16")
    )


@pytest.mark.parametrize("pass_name", ["weight_only", "quantize:mode=dynamic", "fp16"])
def test_a_weight_read_through_identity_copies_is_compressed_once(tmp_path: Path, pass_name: str) -> None:
    """Run alone (no fold first), each lossy pass compresses the reused weight; no float copy stays beside it."""
    path = _reused_layer(tmp_path / "m.onnx")
    plan = {"passes": [pass_name], "verify": {"latency_runs": 0, "report_only": True}}
    result = graphopt.optimize(path, plan)
    assert result.report.lifted_constants == 2
    assert not any(n.op_type == "Identity" for n in result.model.graph)
    assert _float_bytes(result) < 64 * 64 * 4  # the float32 original is gone


def _masked_table(path: Path) -> Path:
    """An attention bias looked up from a table whose row 0 is -inf (padding), beside an ordinary MatMul."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((13, 64)).astype(np.float32)
    table[0] = -np.inf
    w = rng.standard_normal((64, 64)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["bias"], name="lookup"),
        helper.make_node("MatMul", ["x", "W"], ["h"], name="proj"),
        helper.make_node("Add", ["h", "bias"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "masked",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "W")],
    )
    return toy.save(toy._model(graph), path)


@pytest.mark.parametrize("pass_name", ["weight_only", "quantize"])
def test_a_table_holding_minus_inf_stays_in_float(tmp_path: Path, pass_name: str) -> None:
    """A -inf row would get an infinite scale and read back as NaN: the table is left in float, the rest goes on."""
    path = _masked_table(tmp_path / "m.onnx")
    ids = np.array([0, 3, 0, 12], np.int64)
    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x, ids=ids)
    plan = {"passes": [pass_name], "verify": {"latency_runs": 0}}
    result = graphopt.optimize(path, plan, calibration=tmp_path / "calib.npz")
    out = tmp_path / "o.onnx"
    graphopt.save(result.model, out)
    got = ort.InferenceSession(str(out)).run(None, {"x": x, "ids": ids})[0]
    want = ort.InferenceSession(str(path)).run(None, {"x": x, "ids": ids})[0]
    assert not np.isnan(got).any() and np.array_equal(np.isinf(got), np.isinf(want))
    table = onnx.load(out).graph.initializer
    assert any(t.name == "table" and t.data_type == TensorProto.FLOAT for t in table)
    assert result.report.passes[0].modified  # the MatMul was still compressed


def test_exclude_names_a_lookup_table_and_a_typo_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _masked_table(tmp_path / "m.onnx")
    table = np.random.default_rng(0).standard_normal((13, 64)).astype(np.float32)
    model = onnx.load(path)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(table, "table"))  # finite now: only exclude keeps it
    onnx.save(model, path)
    verify = {"latency_runs": 0, "report_only": True}
    plan = {"passes": ["weight_only:exclude=[table, no_such_layer]"], "verify": verify}
    with caplog.at_level(logging.WARNING, logger="graphopt.pipeline"):
        result = graphopt.optimize(path, plan)
    kept = result.model.graph.initializers["table"].const_value
    assert kept is not None and kept.dtype.name == "FLOAT"
    assert "'no_such_layer' matches no node name and no weight name" in caplog.text
    assert "'table'" not in caplog.text


def test_the_integer_weight_share_counts_float_layers_behind_a_dequantize(tmp_path: Path) -> None:
    """A Conv that reads its int8 weight through a DequantizeLinear ORT does not fuse runs in float: its weights
    count against the share of weights in integer kernels (vietcombank-captcha was reported at 100%, ~55% real)."""
    import onnx_ir as ir

    from graphopt import ort_view

    rng = np.random.default_rng(3)
    conv_codes = rng.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8)  # 288 weights, left in float by ORT
    gemm_codes = rng.integers(-127, 128, (64, 32)).astype(np.int8)  # 2048 weights, fused into an integer kernel
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["conv_codes", "scale"], ["w1"]),
            helper.make_node("Conv", ["x", "w1"], ["y1"], name="conv"),
            helper.make_node("DequantizeLinear", ["gemm_codes", "gemm_scale"], ["w2"]),
            helper.make_node("Gemm", ["x2", "w2"], ["y2"], name="head"),
        ],
        "mixed",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8]),
            helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["batch", 64]),
        ],
        [
            helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["batch", 8, 6, 6]),
            helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["batch", 32]),
        ],
        [
            numpy_helper.from_array(conv_codes, "conv_codes"),
            numpy_helper.from_array(gemm_codes, "gemm_codes"),
            numpy_helper.from_array(np.float32(0.01), "scale"),
            numpy_helper.from_array(np.float32(0.02), "gemm_scale"),
        ],
    )
    model = ir.load(str(toy.save(toy._model(graph), tmp_path / "m.onnx")))
    view = ort_view.inspect_runtime(model)
    assert view.integer_kernels == 1 and view.float_compute == 1, view.ops
    assert view.integer_weight_share == pytest.approx(2048 / (2048 + 288))
