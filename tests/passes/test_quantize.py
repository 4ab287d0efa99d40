from __future__ import annotations

from collections import Counter
from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import hardware, io, recipe, runtime, serialize, verify
from graphopt.calibration.sources import DataSpec
from graphopt.errors import DataError, RecipeError
from graphopt.passes.fold.constants import FoldConstantsPass
from graphopt.passes.quantize import QuantizeConfig, QuantizeQDQPass
from graphopt.passes.quantize.calibrate import collect_ranges
from graphopt.passes.quantize.select import calibration_targets
from tests import toy

DATA = Path(str(resources.files("graphopt") / "data"))


def _ort_ops(model: ir.Model, tmp_path: Path) -> Counter[str]:
    """Op histogram of the graph ONNX Runtime actually runs after its own fusions."""
    optimized, _ = runtime.optimized_graph(model, threads=1)
    return Counter(n.op_type for n in optimized.graph)


def _synthetic_ranges(
    model: ir.Model, config: QuantizeConfig, lo: float = -4.0, hi: float = 4.0
) -> dict[str, tuple[float, float]]:
    return {name: (lo, hi) for name in calibration_targets(model, config)}


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    with np.load(DATA / "digits_test.npz") as test, np.load(DATA / "digits_calib.npz") as calib:
        return {"test": test["input"], "labels": test["labels"], "calib": calib["input"]}


@pytest.fixture(scope="module")
def quantized_cnn(digits: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> tuple[ir.Model, ir.Model]:
    reference = io.load_model(DATA / "digits_cnn.onnx")
    FoldConstantsPass()(reference)
    model = reference.clone()
    calib = tmp_path_factory.mktemp("calib") / "calib.npz"
    np.savez(calib, input=digits["calib"])
    config = QuantizeConfig()
    ranges = collect_ranges(model, DataSpec(source=str(calib), samples=128, batch_size=32), config)
    result = QuantizeQDQPass(config, ranges)(model)
    assert result.modified
    return reference, model


def test_cnn_fuses_into_integer_kernels(quantized_cnn: tuple[ir.Model, ir.Model], tmp_path: Path) -> None:
    _, model = quantized_cnn
    serialize.check_model(model)
    ops = _ort_ops(model, tmp_path)
    # Every Conv, both residual Adds, the global pooling and the Gemm run as integer kernels.
    assert ops["QLinearConv"] == 6 and ops["QLinearAdd"] == 2 and ops["QGemm"] == 1
    assert ops["QLinearGlobalAveragePool"] == 1 and ops["ReduceMean"] == 0
    assert ops["Conv"] == 0 and ops["FusedConv"] == 0
    # Conv weights and every int32 bias drop their all-zero zero points; QGemm needs its weight's.
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None]
    arity = {n.inputs[0].name: len(n.inputs) for n in dqs}
    assert arity["fc.weight_quantized"] == 3 and arity["fc.bias_quantized"] == 2
    assert all(count == 2 for name, count in arity.items() if name.startswith("block"))


def _gap_model(tmp_path: Path, keepdims: int) -> ir.Model:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("ReduceMean", ["r", "axes"], ["m"], name="gap", keepdims=keepdims),
            helper.make_node("Reshape", ["m", "shape"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "Wf"], ["y"], name="fc", transB=1),
        ],
        "gap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        [
            numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "W"),
            numpy_helper.from_array(np.array([-1, -2], np.int64), "axes"),
            numpy_helper.from_array(np.array([-1, 4], np.int64), "shape"),
            numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "Wf"),
        ],
    )
    return io.load_model(toy.save(toy._model(graph), tmp_path / "gap.onnx"))


@pytest.mark.parametrize("keepdims", [1, 0])
def test_spatial_mean_becomes_an_integer_pool(keepdims: int, tmp_path: Path) -> None:
    model = _gap_model(tmp_path, keepdims)
    reference = model.clone()
    config = QuantizeConfig()
    ranges = collect_ranges(model, DataSpec(samples=32, batch_size=8), config)
    quantize = QuantizeQDQPass(config, ranges)
    quantize(model)
    assert quantize.details["mean_to_pool"] == 1
    assert "ReduceMean" not in [n.op_type for n in model.graph]
    assert [n.name for n in model.graph if n.op_type == "GlobalAveragePool"] == ["gap"]
    assert _ort_ops(model, tmp_path)["QLinearGlobalAveragePool"] == 1
    x = np.random.default_rng(1).standard_normal((8, 3, 6, 6)).astype(np.float32)
    expected = runtime.run(runtime.create_session(reference), {"x": x})["y"]
    got = runtime.run(runtime.create_session(model), {"x": x})["y"]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


def test_a_mean_over_a_float_tensor_stays_reduce_mean(tmp_path: Path) -> None:
    model = _gap_model(tmp_path, 1)
    config = QuantizeConfig(exclude_tensors=("r",))  # what the fallback sets: the pool reads float
    quantize = QuantizeQDQPass(config, collect_ranges(model, DataSpec(samples=16, batch_size=8), config))
    quantize(model)
    assert quantize.details["mean_to_pool"] == 0 and "ReduceMean" in [n.op_type for n in model.graph]


def test_cnn_accuracy_and_size(quantized_cnn: tuple[ir.Model, ir.Model], digits: dict[str, np.ndarray]) -> None:
    reference, model = quantized_cnn
    before = verify.label_accuracy(reference, {"input": digits["test"]}, digits["labels"])
    after = verify.label_accuracy(model, {"input": digits["test"]}, digits["labels"])
    assert after >= before - 0.005
    assert serialize.model_bytes(model) < 0.3 * serialize.model_bytes(reference)


def test_second_run_and_qat_models_are_left_alone(quantized_cnn: tuple[ir.Model, ir.Model], tmp_path: Path) -> None:
    _, model = quantized_cnn
    copy = model.clone()
    assert not QuantizeQDQPass(QuantizeConfig(), {})(copy).modified
    qat = io.load_model(toy.save(toy.qdq_weight(), tmp_path / "qat.onnx"))
    assert not QuantizeQDQPass(QuantizeConfig(), {})(qat).modified
    assert [n.op_type for n in qat.graph] == ["QuantizeLinear", "DequantizeLinear", "MatMul"]


def test_nothing_to_quantize(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"])],
        "softmax",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    model = io.load_model(toy.save(toy._model(graph), tmp_path / "s.onnx"))
    assert calibration_targets(model, QuantizeConfig()) == []
    assert not QuantizeQDQPass(QuantizeConfig(), {})(model).modified


def _relu_mlp(tmp_path: Path) -> ir.Model:
    return io.load_model(toy.save(toy.relu_mlp(), tmp_path / "mlp.onnx"))


def test_relu_is_absorbed_only_with_asymmetric_activations(tmp_path: Path) -> None:
    for symmetric, relus in ((False, 0), (True, 1)):
        model = _relu_mlp(tmp_path)
        config = QuantizeConfig(activation_symmetric=symmetric, activation_type="int8" if symmetric else "uint8")
        ranges = collect_ranges(model, DataSpec(samples=32, batch_size=8), config)
        QuantizeQDQPass(config, ranges)(model)
        assert [n.op_type for n in model.graph].count("Relu") == relus
        x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
        reference = _relu_mlp(tmp_path)
        expected = runtime.run(runtime.create_session(reference), {"x": x})["y"]
        got = runtime.run(runtime.create_session(model), {"x": x})["y"]
        assert np.abs(got - expected).max() < 0.1 * np.abs(expected).max()


def test_exact_zeros_stay_zero(tmp_path: Path) -> None:
    model = _relu_mlp(tmp_path)
    weight = model.graph.initializers["W1"]
    pruned = weight.const_value.numpy().copy()
    pruned[::2] = 0.0
    weight.const_value = ir.tensor(pruned, name="W1")
    config = QuantizeConfig()
    QuantizeQDQPass(config, _synthetic_ranges(model, config))(model)
    stored = model.graph.initializers["W1_quantized"].const_value.numpy()
    assert np.all(stored[::2] == 0)


def test_excluded_nodes_stay_float(tmp_path: Path) -> None:
    model = _relu_mlp(tmp_path)
    config = QuantizeConfig(exclude=("fc2",))
    QuantizeQDQPass(config, _synthetic_ranges(model, config))(model)
    assert "W2" in model.graph.initializers and "W1_quantized" in model.graph.initializers


def test_dynamic_mode_fuses_matmuls_and_needs_no_data(tmp_path: Path) -> None:
    model = _relu_mlp(tmp_path)
    config = QuantizeConfig(mode="dynamic")
    assert collect_ranges(model, None, config) == {}
    assert QuantizeQDQPass(config, {})(model).modified
    assert _ort_ops(model, tmp_path)["DynamicQuantizeMatMul"] == 2
    x = np.random.default_rng(2).standard_normal((4, 16)).astype(np.float32)
    expected = runtime.run(runtime.create_session(_relu_mlp(tmp_path)), {"x": x})["y"]
    got = runtime.run(runtime.create_session(model), {"x": x})["y"]
    assert np.abs(got - expected).max() < 0.05 * np.abs(expected).max()


def test_embedding_tables_shrink(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    table = rng.standard_normal((100, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"])],
        "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, 64])],
        [numpy_helper.from_array(table, "table")],
    )
    model = io.load_model(toy.save(toy._model(graph), tmp_path / "emb.onnx"))
    assert QuantizeQDQPass(QuantizeConfig(), {})(model).modified
    assert serialize.model_bytes(model) < 0.3 * table.nbytes
    ids = rng.integers(0, 100, (3, 5)).astype(np.int64)
    got = runtime.run(runtime.create_session(model), {"ids": ids})["y"]
    np.testing.assert_allclose(got, table[ids], atol=np.abs(table).max() / 127)
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_static_needs_calibration_data_and_auto_falls_back_to_dynamic(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pass 'quantize' needs calibration data"):
        graphopt.optimize(_relu_mlp(tmp_path), ["quantize:mode=static"])
    result = graphopt.optimize(_relu_mlp(tmp_path), {"passes": ["quantize"], "budget": {"min_cosine": 0.99}})
    assert result.report.passes[0].details["mode"] == "dynamic"


def _at_opset(tmp_path: Path, version: int) -> ir.Model:
    proto = toy.already_folded()
    proto.opset_import[0].version = version
    return io.load_model(toy.save(proto, tmp_path / f"old{version}.onnx"))


def test_old_opsets_get_per_tensor_scales_or_are_left_alone(tmp_path: Path) -> None:
    """Run on its own (no pipeline to convert it), the pass adapts to the model's opset instead of refusing."""
    model = _at_opset(tmp_path, 11)
    quantize = QuantizeQDQPass(QuantizeConfig(), _synthetic_ranges(model, QuantizeConfig()))
    assert quantize(model).modified and "per-tensor" in quantize.details["notes"][0]
    serialize.check_model(model)
    runtime.create_session(model)  # ORT loads it
    assert all("axis" not in n.attributes for n in model.graph if n.op_type == "DequantizeLinear")
    model = _at_opset(tmp_path, 9)
    quantize = QuantizeQDQPass(QuantizeConfig(), _synthetic_ranges(model, QuantizeConfig()))
    assert not quantize(model).modified and "no Q/DQ" in quantize.details["skipped"]


def test_the_pipeline_converts_an_old_opset_when_outputs_stay_equal(tmp_path: Path) -> None:
    model = _at_opset(tmp_path, 11)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    result = graphopt.optimize(model, {"passes": ["quantize:mode=static"], "budget": {}}, calibration=calib)
    assert result.report.opset["before"] == 11 and result.report.opset["after"] == 13, result.report.opset
    assert result.model.opset_imports[""] == 13 and "notes" not in result.report.passes[0].details
    assert "Opset: 11 → 13" in result.report.to_markdown()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"activation_type": "int4"}, "'int4' is not one of 'uint8', 'int8', 'uint16', 'int16'"),
        ({"method": "kl"}, "'kl' is not one of 'minmax', 'percentile', 'entropy', 'mse'"),
        ({"mode": "qat"}, "'qat' is not one of 'auto', 'static', 'dynamic'"),
        ({"op_types": "Conv"}, "op_types: expected a list; got 'Conv'"),
        ({"per_channel": 1}, "per_channel: expected bool; got 1 (int)"),
        ({"tensor_types": ["x"]}, "tensor_types: expected a mapping"),
    ],
)
def test_bad_configs(options: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe.make_step("quantize", options, "recipe")
    assert message in str(info.value)


def _outlier_mlp(tmp_path: Path) -> tuple[ir.Model, Path, np.ndarray]:
    """x[.., 64] -> MatMul -> +bias, where input channel 5 is 25x larger than the rest (as BERT's GELU outputs)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
            helper.make_node("Add", ["h", "b"], ["y"], name="bias"),
        ],
        "outliers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 32])],
        [
            numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b"),
        ],
    )
    x = rng.standard_normal((256, 4, 64)).astype(np.float32)
    x[..., 5] *= 25.0
    data = tmp_path / "outliers.npz"
    np.savez(data, x=x[:128])
    return io.load_model(toy.save(toy._model(graph), tmp_path / "outliers.onnx")), data, x[128:]


def test_outlier_channels_run_in_float_beside_the_int8_product(tmp_path: Path) -> None:
    reference, data, test = _outlier_mlp(tmp_path)
    expected = runtime.run(runtime.create_session(reference), {"x": test})["y"]
    errors = {}
    for outliers in (3.0, 0.0):
        model = reference.clone()
        config = QuantizeConfig(outliers=outliers, method="minmax", smooth=False)  # the split alone
        quantize = QuantizeQDQPass(config, collect_ranges(model, DataSpec(source=str(data), batch_size=16), config))
        quantize(model)
        assert quantize.details["outlier_channels"] == (1 if outliers else 0)
        serialize.check_model(model)
        got = runtime.run(runtime.create_session(model), {"x": test})["y"]
        errors[outliers] = float(np.abs(got - expected).max())
        # The int8 product (bias fused) still runs as one integer kernel.
        assert _ort_ops(model, tmp_path)["MatMulIntegerToFloat"] == 1
        assert [v.name for v in model.graph.outputs] == ["y"]
    assert errors[3.0] < 0.35 * errors[0.0]
    # Names that layer-wise comparison matches with the reference carry the reference's values:
    # the inlier-only product and the clipped input are renamed.
    split = reference.clone()
    config = QuantizeConfig(method="minmax", smooth=False)
    QuantizeQDQPass(config, collect_ranges(split, DataSpec(source=str(data), batch_size=16), config))(split)
    produced = {out.name for node in split.graph for out in node.outputs}
    assert {"h_inliers", "x_inliers_DequantizeLinear", "y"} <= produced
    assert not {"h", "x_DequantizeLinear"} & produced


def test_a_shared_weight_is_split_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["a"], name="fc_a"),
            helper.make_node("MatMul", ["x", "W"], ["b"], name="fc_b"),
            helper.make_node("Sub", ["a", "b"], ["y"], name="diff"),
        ],
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4, 32])],
        [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W")],
    )
    model = io.load_model(toy.save(toy._model(graph), tmp_path / "shared.onnx"))
    x = rng.standard_normal((64, 4, 64)).astype(np.float32)
    x[..., 9] *= 25.0
    np.savez(tmp_path / "x.npz", x=x)
    config = QuantizeConfig(method="minmax", smooth=False)
    QuantizeQDQPass(config, collect_ranges(model, DataSpec(source=str(tmp_path / "x.npz")), config))(model)
    int8 = [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.INT8]
    assert [v.name for v in int8] == ["W_inliers_quantized"]


def test_outlier_channel_choice() -> None:
    from graphopt.passes.quantize.outliers import outlier_channels

    hi = np.ones(256, np.float32)
    hi[[3, 70]] = [20.0, 9.0]
    assert outlier_channels(-hi, hi, 3.0).tolist() == [3, 70]
    assert outlier_channels(-hi, hi, 10.0).tolist() == [3]
    assert outlier_channels(-hi, hi, 0.0).size == 0  # disabled
    hi[:40] = 50.0  # a sixth of the channels large: none stands out from the rest
    assert outlier_channels(-hi, hi, 3.0).size == 0


def test_without_islands_every_compute_output_is_quantized_as_ort_does(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="fc"),
            helper.make_node("Softmax", ["h"], ["y"], name="softmax"),  # not an op the pass quantizes
        ],
        "softmax_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W")],
    )
    quantized = {}
    for islands in (True, False):
        model = io.load_model(toy.save(toy._model(graph), tmp_path / "head.onnx"))
        config = QuantizeConfig(islands=islands)
        QuantizeQDQPass(config, _synthetic_ranges(model, config))(model)
        quantized[islands] = sorted(n.inputs[0].name for n in model.graph if n.op_type == "QuantizeLinear")
    assert quantized == {True: ["x"], False: ["h", "x"]}


def test_fallback_alternatives_keep_speed_and_size(monkeypatch: pytest.MonkeyPatch) -> None:
    from graphopt.passes.quantize import config as quantize_module

    def changed(config: QuantizeConfig) -> list[dict[str, object]]:
        return [
            {k: v for k, v in vars(alt).items() if v != getattr(config, k)}
            for alt in quantize_module.range_alternatives(config)
        ]

    monkeypatch.setattr(hardware, "u8s8_saturates", lambda: True)
    eight_bit = QuantizeConfig(method="minmax", reduce_range=False)
    assert changed(eight_bit) == [{"reduce_range": "auto"}, {"method": "percentile"}, {"method": "mse"}]
    assert changed(QuantizeConfig(method="mse")) == [{"method": "percentile"}]
    assert changed(QuantizeConfig(mode="dynamic")) == []
    monkeypatch.setattr(hardware, "u8s8_saturates", lambda: False)
    assert changed(eight_bit) == [{"method": "percentile"}, {"method": "mse"}]


def test_float16_models_stay_valid(tmp_path: Path) -> None:
    """float16 tensors are left in float16 (Q/DQ of float16 needs opset 19 and float16 scales)."""
    proto = toy.relu_mlp()
    half = onnx.numpy_helper
    for init in proto.graph.initializer:
        init.CopyFrom(half.from_array(half.to_array(init).astype(np.float16), init.name))
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    model = io.load_model(toy.save(proto, tmp_path / "half.onnx"))
    quantize = QuantizeQDQPass(QuantizeConfig(), _synthetic_ranges(model, QuantizeConfig()))
    assert not quantize(model).modified and quantize.details["skipped"].startswith("nothing to quantize")
    runtime.create_session(model)


@pytest.mark.parametrize(
    ("shape", "kernel", "strides", "pads", "dilations", "group"),
    [
        ((2, 4, 9, 11), (3, 3), (2, 1), (1, 0, 2, 1), (2, 1), 2),
        ((1, 6, 7, 7), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 6),  # depthwise
        ((3, 5, 13), (5,), (2,), (2, 1), (1,), 1),  # 1-D
    ],
)
def test_conv_patches_times_the_weight_is_the_convolution(shape, kernel, strides, pads, dilations, group) -> None:
    from graphopt.numerics.patches import ConvGeometry, conv_patches

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    out_channels = 2 * group
    w = rng.standard_normal((out_channels, shape[1] // group, *kernel)).astype(np.float32)
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), strides=list(strides), pads=list(pads),
        dilations=list(dilations), group=group,
    )  # fmt: skip
    graph = helper.make_graph(
        [node], "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (expected,) = runtime.create_session(ir.serde.deserialize_model(proto), threads=1).run(None, {"x": x})
    geometry = ConvGeometry(tuple(kernel), tuple(strides), tuple(pads), tuple(dilations), group)
    patches = conv_patches(x, geometry, rows=10**6, rng=rng)  # every position, in order
    per = out_channels // group
    got = np.concatenate(
        [patches[:, j] @ w[j * per : (j + 1) * per].reshape(per, -1).T for j in range(group)], axis=1
    )  # [positions, O]
    want = np.moveaxis(expected, 1, -1).reshape(-1, out_channels)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    drawn = conv_patches(x, geometry, rows=5, rng=np.random.default_rng(1))
    assert drawn.shape == (5, *patches.shape[1:])
    assert all(any(np.array_equal(row, full) for full in patches) for row in drawn)


def test_hessian_blocks_are_the_diagonal_blocks_of_xtx() -> None:
    from graphopt.passes.quantize.rounding import HessianPlan

    rng = np.random.default_rng(0)
    k = 700  # two blocks of 350 at block=512
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([None, k]))
    w = ir.Value(name="w", const_value=ir.tensor(rng.standard_normal((k, 8)).astype(np.float32)))
    node = ir.node("MatMul", [x, w])
    plan = HessianPlan([node], rows=10**6, block=512)
    batches = [rng.standard_normal((3, 50, k)).astype(np.float32) for _ in range(2)]
    for batch in batches:
        plan("x", batch)
    (hessian,) = plan.hessians().values()
    rows = np.concatenate([b.reshape(-1, k) for b in batches])
    full = rows.T @ rows / len(rows)
    assert hessian.shape == (2, 350, 350)
    np.testing.assert_allclose(hessian[0], full[:350, :350], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(hessian[1], full[350:, 350:], rtol=1e-4, atol=1e-4)


def test_gptq_rounding_lowers_layer_error_and_keeps_the_integer_range(
    digits: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """GPTQ moves which integer each weight gets, never the scales or the range ORT's kernels need."""
    from graphopt.numerics import affine
    from graphopt.passes.quantize.config import resolve_reduce_range

    reference = io.load_model(DATA / "digits_cnn.onnx")
    FoldConstantsPass()(reference)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=digits["calib"])
    results = {}
    for rounding in ("nearest", "gptq"):
        model = reference.clone()
        config = QuantizeConfig(rounding=rounding)
        ranges = collect_ranges(model, DataSpec(source=str(calib), samples=128, batch_size=32), config)
        quantize = QuantizeQDQPass(config, ranges)
        assert quantize(model).modified
        results[rounding] = (model, quantize.details)
    nearest, gptq = results["nearest"][1], results["gptq"][1]
    assert nearest["gptq_weights"] == 0 and "gptq_output_error_ratio" not in nearest
    assert gptq["gptq_weights"] == gptq["weights"] > 0
    assert gptq["gptq_output_error_ratio"] < 0.8
    config = QuantizeConfig()
    qmin, qmax = affine.qrange("int8", symmetric=True, reduce_range=resolve_reduce_range(config))
    model = results["gptq"][0]
    codes = [v.const_value.numpy() for v in model.graph.initializers.values() if v.name.endswith("_quantized")]
    weights = [c for c in codes if c.dtype == np.int8]
    assert weights and all(qmin <= c.min() and c.max() <= qmax for c in weights)
    plain = results["nearest"][0].graph.initializers
    differ = [
        not np.array_equal(plain[name].const_value.numpy(), value.const_value.numpy())
        for name, value in model.graph.initializers.items()
        if name in plain and name.endswith("_quantized") and value.dtype == ir.DataType.INT8
    ]
    assert any(differ)
    before = verify.label_accuracy(reference, {"input": digits["test"]}, digits["labels"])
    assert verify.label_accuracy(model, {"input": digits["test"]}, digits["labels"]) >= before - 0.005


def test_gptq_of_a_grouped_conv_is_each_groups_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A grouped conv's groups (and a weight's Hessian blocks) are rounded together as one stack: each group gets
    the codes it gets as a conv of its own, and a memo hands the same result to a second run."""
    from graphopt.numerics import affine
    from graphopt.passes.quantize import rounding

    rng = np.random.default_rng(0)
    group, per, kernel = 6, 4, (3, 3)
    w = rng.standard_normal((group * per, 2, *kernel)).astype(np.float32)
    w[rng.random(w.shape) < 0.1] = 0  # pruned weights stay zero
    k = 2 * 9
    x = rng.standard_normal((500, group, k)).astype(np.float32) * rng.uniform(0.1, 3, k).astype(np.float32)
    hessian = np.einsum("ngk,ngl->gkl", x, x) / len(x)

    def conv(g: int) -> ir.Node:
        return ir.node("Conv", [ir.Value(name="x"), ir.Value(name="w")], attributes={"group": g})

    params = affine.weight_params(w, "int8", axis=0, symmetric=True, reduce_range=True)
    codes, nearest, rounded = rounding.round_weight(w, params, hessian, conv(group), symmetric=True, reduce_range=True)
    assert rounded < nearest
    for j in range(group):
        own = affine.QuantParams(params.scale[j * per : (j + 1) * per], params.zero_point[j * per : (j + 1) * per],
                                 params.qtype, 0)  # fmt: skip
        alone = rounding.round_weight(
            w[j * per : (j + 1) * per], own, hessian[j : j + 1], conv(1), symmetric=True, reduce_range=True
        )
        np.testing.assert_array_equal(codes[j * per : (j + 1) * per], alone[0])
    assert np.all(codes[w == 0] == 0)
    assert rounding.memo_key(w, params, hessian, conv(group), True) == rounding.memo_key(
        w.copy(), params, hessian.copy(), conv(group), True
    )
    assert rounding.memo_key(w, params, hessian * 2, conv(group), True) != rounding.memo_key(
        w, params, hessian, conv(group), True
    )


def test_the_fallbacks_trials_reuse_gptq_codes(
    digits: dict[str, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every run of the pass on one calibration (the accuracy fallback's trials) rounds each weight once."""
    from graphopt.passes.quantize import rounding

    reference = io.load_model(DATA / "digits_cnn.onnx")
    FoldConstantsPass()(reference)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=digits["calib"])
    config = QuantizeConfig()
    ranges = collect_ranges(reference, DataSpec(source=str(calib), samples=64, batch_size=32), config)
    calls = []
    original = rounding.round_weight
    monkeypatch.setattr(rounding, "round_weight", lambda *a, **k: calls.append(1) or original(*a, **k))
    outputs = []
    for _ in range(2):
        model = reference.clone()
        quantize = QuantizeQDQPass(config, ranges)
        quantize(model)
        outputs.append({n: v.const_value.numpy() for n, v in model.graph.initializers.items()})
    assert len(calls) == quantize.details["gptq_weights"] > 0  # the second run rounded nothing again
    assert outputs[0].keys() == outputs[1].keys()
    assert all(np.array_equal(outputs[0][n], outputs[1][n]) for n in outputs[0])


def test_weights_that_arrive_as_cast_mul_are_quantized_as_weights(tmp_path: Path) -> None:
    """A weight dequantized in the graph (int8 codes, Cast, Mul by per-column scales: an int8 export) is a weight:
    per-channel int8 through a DequantizeLinear, the Cast·Mul gone, not a per-tensor activation Q/DQ."""
    rng = np.random.default_rng(0)
    codes = rng.integers(-127, 128, (16, 8)).astype(np.int8)
    scale = rng.uniform(0.001, 0.02, (1, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", ["codes"], ["codes_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["codes_f", "scale"], ["w"]),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "int8_export", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(codes, "codes"), numpy_helper.from_array(scale, "scale")],
    )  # fmt: skip
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    reference = io.load_model(path)
    model = reference.clone()
    x = rng.standard_normal((64, 16)).astype(np.float32)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=x)
    for islands in (True, False):  # islands=False (the latency budget's placement) selects every Mul
        model = reference.clone()
        config = QuantizeConfig(smooth=False, islands=islands)
        ranges = collect_ranges(model, DataSpec(source=str(calib), samples=64), config)
        assert "w" not in ranges  # not calibrated as an activation
        quantize = QuantizeQDQPass(config, ranges)
        assert quantize(model).modified and quantize.details["weights"] == 1
        ops = Counter(n.op_type for n in model.graph)
        assert ops["Cast"] == 0 and ops["Mul"] == 0 and "codes" not in model.graph.initializers
        matmul = next(n for n in model.graph if n.op_type == "MatMul")
        dq = matmul.inputs[1].producer()
        assert dq.op_type == "DequantizeLinear" and dq.inputs[0].const_value is not None
        assert dq.inputs[0].dtype == ir.DataType.INT8 and dq.inputs[1].const_value.shape == (8,)  # per channel
        expected = x @ (codes.astype(np.float32) * scale)
        (got,) = runtime.create_session(model, threads=1).run(None, {"x": x})
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.03


def _layer_norm_model(tmp_path: Path, residual: bool) -> tuple[ir.Model, Path, np.ndarray]:
    """LayerNorm whose scale makes two channels 30x the others, read by two MatMuls (and a residual Add)."""
    rng = np.random.default_rng(0)
    gamma = np.ones(32, np.float32)
    gamma[[3, 17]] = 30.0
    inits = [
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(rng.normal(0, 0.1, 32).astype(np.float32), "beta"),
        numpy_helper.from_array(rng.normal(0, 0.2, (32, 24)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (32, 24)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], axis=-1),
        helper.make_node("MatMul", ["h", "w1"], ["y1"]),
        helper.make_node("MatMul", ["h", "w2"], ["y2"]),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 24]) for n in ("y1", "y2")]
    if residual:
        nodes.append(helper.make_node("Add", ["h", "x"], ["r"]))
        outputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, ["n", 32]))
    graph = helper.make_graph(
        nodes, "ln", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])], outputs, inits
    )
    path = tmp_path / f"ln{int(residual)}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = rng.standard_normal((256, 32)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:128])
    return io.load_model(path), tmp_path / "calib.npz", x[128:]


@pytest.mark.parametrize("residual", [False, True])
def test_smoothquant_moves_outlier_channels_into_the_weights(tmp_path: Path, residual: bool) -> None:
    """Exact in float; the int8 outputs come closer to float; folded into the LayerNorm when only the MatMuls
    read it, else one Mul feeds them and the residual still reads the unscaled tensor."""
    reference, calib, x = _layer_norm_model(tmp_path, residual)
    (want,) = [runtime.create_session(reference, threads=1).run(None, {"x": x})]
    errors, details = {}, {}
    for smooth in (False, True):
        model = reference.clone()
        config = QuantizeConfig(smooth=smooth, rounding="nearest", outliers=0.0)
        quantize = QuantizeQDQPass(config, collect_ranges(model, DataSpec(source=str(calib), samples=128), config))
        assert quantize(model).modified
        got = runtime.create_session(model, threads=1).run(None, {"x": x})
        errors[smooth] = max(np.linalg.norm(g - w) / np.linalg.norm(w) for g, w in zip(got, want, strict=True))
        details[smooth] = (quantize.details, Counter(n.op_type for n in model.graph), model)
    info, ops, model = details[True]
    assert info["smoothed"] == 1 and details[False][0]["smoothed"] == 0
    assert errors[True] < 0.85 * errors[False], errors
    assert ops["Mul"] == (1 if residual else 0)
    produced = {out.name for node in model.graph for out in node.outputs}
    if residual:
        add = next(n for n in model.graph if n.op_type == "Add")
        assert any(v is not None and v.name == "h" for v in add.inputs)  # the residual reads h unscaled
    else:  # folded into the LayerNorm: its output holds other values under a new name (layer-wise matching)
        assert "h" not in produced and "h_smoothed" in produced
    # each weight once, in int8: no float copy left behind
    weights = [v for v in model.graph.initializers.values() if v.const_value.shape == (32, 24)]
    assert len(weights) == 2 and all(v.dtype == ir.DataType.INT8 for v in weights)


def test_smoothquant_gives_inputs_that_share_a_weight_one_scale(tmp_path: Path) -> None:
    """Two steps of an unrolled decoder read one weight: one scale vector for both inputs, no weight copy."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.2, (16, 8)).astype(np.float32)
    boost = np.ones(16, np.float32)
    boost[5] = 40.0
    nodes = [
        helper.make_node("Mul", ["a", "boost"], ["a2"]),
        helper.make_node("Mul", ["b", "boost"], ["b2"]),
        helper.make_node("MatMul", ["a2", "w"], ["ya"]),
        helper.make_node("MatMul", ["b2", "w"], ["yb"]),
    ]
    graph = helper.make_graph(
        nodes, "shared",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 16]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["n", 8]) for n in ("ya", "yb")],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(boost, "boost")],
    )  # fmt: skip
    path = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    model = io.load_model(path)
    np.savez(tmp_path / "c.npz", a=rng.standard_normal((64, 16)).astype(np.float32),
             b=rng.standard_normal((64, 16)).astype(np.float32))  # fmt: skip
    config = QuantizeConfig(rounding="nearest", outliers=0.0, op_types=("MatMul",))
    quantize = QuantizeQDQPass(
        config, collect_ranges(model, DataSpec(source=str(tmp_path / "c.npz"), samples=64), config)
    )
    assert quantize(model).modified
    assert quantize.details["smoothed"] == 2 and len(quantize.details["smoothing"]) == 1
    assert quantize.details["weights"] == 1
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    assert matmuls[0].inputs[1] is matmuls[1].inputs[1]


@pytest.mark.parametrize("residual", [False, True])
def test_smoothing_alone_is_exact_in_float(tmp_path: Path, residual: bool) -> None:
    from graphopt.passes.quantize import smooth as quantize_smooth

    reference, calib, x = _layer_norm_model(tmp_path, residual)
    model = reference.clone()
    config = QuantizeConfig(rounding="nearest", outliers=0.0)
    stats = collect_ranges(model, DataSpec(source=str(calib), samples=128), config)
    nodes = [n for n in model.graph if n.op_type == "MatMul"]
    (plan,) = quantize_smooth.plan(nodes, stats.channels, stats.power, 63, set())
    assert plan.scales.max() / plan.scales.min() > 3  # the two large channels are scaled down
    values = {v.name: v for n in model.graph for v in n.outputs}
    quantize_smooth.apply(model.graph, plan, values, set())
    want = runtime.create_session(reference, threads=1).run(None, {"x": x})
    got = runtime.create_session(model, threads=1).run(None, {"x": x})
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_every_layer_excluded_is_said_so_not_none_found(tmp_path: Path) -> None:
    """When the search (or the recipe) keeps every Conv/MatMul/Gemm in float, the pass says that, not that the model
    has none (MTCNN's default job said "no float32 Conv/MatMul/Gemm" of a model with eight)."""
    model = io.load_model(toy.save(toy.relu_mlp(), tmp_path / "m.onnx"))
    config = QuantizeConfig(exclude=("fc*",))
    quantize = QuantizeQDQPass(config, _synthetic_ranges(model, QuantizeConfig()))
    assert not quantize(model).modified
    assert quantize.details["skipped"] == "nothing to quantize: all 2 Conv/MatMul/Gemm are excluded (kept in float)"
