from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import io, recipe, runtime, serialize
from graphopt.calibration.sources import DataSpec
from graphopt.errors import DataError, PassError, RecipeError
from graphopt.numerics import blocks as quant_blocks
from graphopt.numerics import nf4 as quant_nf4
from graphopt.ort_view import observed_kernels
from graphopt.passes.weight_only import WeightOnlyConfig, WeightOnlyQuantizePass
from graphopt.passes.weight_only.gptq import collect_hessians
from graphopt.passes.weight_only.layers import plan_layers
from tests import toy

FORMATS = [("matmul_nbits", 4), ("matmul_nbits", 8), ("qdq", 4), ("qdq", 8), ("nf4", 4), ("fp4", 4)]


def _load(proto: onnx.ModelProto, tmp_path: Path, name: str = "m.onnx") -> ir.Model:
    return io.load_model(toy.save(proto, tmp_path / name))


def _mlp(opset: int = toy.OPSET, k: int = 64, hidden: int = 128) -> onnx.ModelProto:
    """x @ W1 -> Relu -> @ W2 -> Sigmoid -> Gemm(W3^T, bias): the three matmul shapes ORT treats differently."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W2"], ["g"], name="fc2"),
            helper.make_node("Sigmoid", ["g"], ["s"], name="sigmoid"),
            helper.make_node("Gemm", ["s", "W3", "b3"], ["y"], name="head", transB=1, alpha=0.5, beta=2.0),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        [
            numpy_helper.from_array((rng.standard_normal((k, hidden)) / 8).astype(np.float32), "W1"),
            numpy_helper.from_array((rng.standard_normal((hidden, k)) / 8).astype(np.float32), "W2"),
            numpy_helper.from_array((rng.standard_normal((32, k)) / 8).astype(np.float32), "W3"),
            numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b3"),
        ],
    )
    return toy._model(graph, opset)


def _embedding() -> onnx.ModelProto:
    table = np.random.default_rng(1).standard_normal((100, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], name="embed")],
        "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5, 64])],
        [numpy_helper.from_array(table, "table")],
    )
    return toy._model(graph)


def _reference(model: ir.Model, config: WeightOnlyConfig, x: np.ndarray) -> np.ndarray:
    """What the MLP computes with each weight replaced by its quantized value (numpy)."""

    def quantized(name: str, transpose: bool = False, alpha: float = 1.0) -> np.ndarray:
        w = model.graph.initializers[name].const_value.numpy()
        w = (w.T if transpose else w) * np.float32(alpha)  # Gemm's alpha is folded into its weight
        block = config.block_for(w.shape[0])
        if config.format in ("nf4", "fp4"):
            return quant_nf4.quantize_bnb4(w, config.format, block, clip_ratios=config.clip_ratios()).dequantize()
        blocks = quant_blocks.quantize_int_blocks(
            w, config.bits, block, symmetric=config.symmetric, clip_ratios=config.clip_ratios(), scale_type="float16"
        )
        return blocks.dequantize()

    h = np.maximum(x @ quantized("W1"), 0)
    s = 1 / (1 + np.exp(-(h @ quantized("W2"))))
    return s @ quantized("W3", transpose=True, alpha=0.5) + 2.0 * model.graph.initializers["b3"].const_value.numpy()


@pytest.mark.parametrize(("fmt", "bits"), FORMATS)
def test_formats_compute_the_quantized_weights_in_onnxruntime(fmt: str, bits: int, tmp_path: Path) -> None:
    config = WeightOnlyConfig(format=fmt, bits=bits, accuracy_level=0)  # type: ignore[arg-type]
    model = _load(_mlp(), tmp_path)
    expected = _reference(model, config, x := np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32))
    float_out = runtime.run(runtime.create_session(model), {"x": x})["y"]
    quantize = WeightOnlyQuantizePass(config)
    assert quantize(model).modified
    serialize.check_model(model)
    assert [v.name for v in model.graph.outputs] == ["y"] and model.graph.outputs[0].shape == ir.Shape(["batch", 32])
    # Float compute (graph rewrites off, or accuracy_level 0): equal up to float32 summation order.
    got = runtime.run(runtime.create_session(model, optimization="disable"), {"x": x})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # ORT's CPU graph as deployed; for qdq its fused MatMulNBits quantizes activations to int8.
    optimized = runtime.run(runtime.create_session(model), {"x": x})["y"]
    np.testing.assert_allclose(optimized, expected, atol=(3e-2 if fmt == "qdq" else 1e-4) * np.abs(expected).max())
    assert np.abs(got - float_out).max() < (0.15 if bits == 4 else 0.02) * np.abs(float_out).max()
    assert quantize.details["ort_cpu_kernels"] == observed_kernels(model)
    assert quantize.details["layers"] == 3 and quantize.details["skipped"] == {}


QUANTIZED_READERS = ("MatMulNBits", "MatMulBnb4", "GatherBlockQuantized", "DequantizeLinear")


def _half_model(dtype: type = np.float16) -> onnx.ModelProto:
    """A float16 model as fp16 exports are: embedding Gather -> MatMul -> Gemm(transB, bias), float16 throughout
    (``dtype`` float32: the same float16 values in float32)."""
    rng = np.random.default_rng(5)
    half = {
        "table": rng.standard_normal((100, 64)),
        "W1": rng.standard_normal((64, 128)) / 8,
        "W2": rng.standard_normal((32, 128)) / 8,
        "b2": rng.standard_normal(32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
            helper.make_node("MatMul", ["e", "W1"], ["h"], name="fc1"),
            helper.make_node("Gemm", ["h2", "W2", "b2"], ["y"], name="head", transB=1, beta=0.5),
            helper.make_node("Reshape", ["h", "flat"], ["h2"], name="flatten"),
        ],
        "half",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 1])],
        [helper.make_tensor_value_info("y", helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), ["batch", 32])],
        [numpy_helper.from_array(v.astype(np.float16).astype(dtype), k) for k, v in half.items()]
        + [numpy_helper.from_array(np.array([-1, 128], np.int64), "flat")],
    )
    graph.node.insert(2, graph.node.pop(3))
    return toy._model(graph)


@pytest.mark.parametrize(("fmt", "bits"), FORMATS)
def test_float16_weights_keep_float16_scales_and_outputs(fmt: str, bits: int, tmp_path: Path) -> None:
    """fp16 exports (ORT GenAI's builder -p fp16): same kernels, with float16 scales, no Cast to float32."""
    config = WeightOnlyConfig(format=fmt, bits=bits, accuracy_level=0)  # type: ignore[arg-type]
    ids = np.random.default_rng(6).integers(0, 100, (4, 1)).astype(np.int64)
    outputs = {}
    for dtype in (np.float16, np.float32):
        model = _load(_half_model(dtype), tmp_path, f"{np.dtype(dtype).name}.onnx")
        quantize = WeightOnlyQuantizePass(config)
        assert quantize(model).modified
        serialize.check_model(model)
        assert quantize.details["layers"] == 2 and quantize.details["embeddings"] == 1
        assert quantize.details["skipped"] == {}
        outputs[dtype] = runtime.run(runtime.create_session(model, optimization="disable"), {"ids": ids})["y"]
        if dtype == np.float16:
            readers = [n for n in model.graph if n.op_type in QUANTIZED_READERS]
            assert len(readers) == 3
            floats = {v.dtype for n in readers for v in n.inputs if v is not None and v.dtype}
            assert {t for t in floats if t.is_floating_point()} == {ir.DataType.FLOAT16}  # activations, scales
            # no float32 scales cast at load (NF4's double-quantized absmax is computed in float32, then cast)
            casts = [n for n in model.graph if n.op_type == "Cast" and n.attributes.get_int("to") == 1]
            assert not casts or fmt in ("nf4", "fp4")
    # The same codes and scales: the float16 model computes what the float32 one does, up to float16 arithmetic.
    assert outputs[np.float16].dtype == np.float16
    got, expected = outputs[np.float16].astype(np.float32), outputs[np.float32]
    np.testing.assert_allclose(got, expected, atol=5e-3 * np.abs(expected).max())


def test_kernels_and_traps_are_reported_as_onnxruntime_runs_them(tmp_path: Path) -> None:
    model = _load(_mlp(), tmp_path)
    quantize = WeightOnlyQuantizePass(WeightOnlyConfig(format="qdq"))
    quantize(model)
    # fc1 feeds a Relu that feeds a MatMul: ORT keeps the DequantizeLinear and a float MatMul there.
    expected = {"DequantizeLinear+MatMul": 1, "MatMulNBits(bits=4, accuracy_level=4)": 2}
    assert quantize.details["ort_cpu_kernels"] == expected == observed_kernels(model)
    assert any("Relu/Clip" in note for note in quantize.details["ort_notes"])  # type: ignore[union-attr]
    assert quantize.details["opset_raised_from"] == toy.OPSET and model.opset_imports[""] == 21
    eight = WeightOnlyQuantizePass(WeightOnlyConfig(bits=8, accuracy_level=0))
    eight(_load(_mlp(), tmp_path))
    assert any("several times slower" in note for note in eight.details["ort_notes"])  # type: ignore[union-attr]


def test_size_and_bits_per_weight(tmp_path: Path) -> None:
    model = _load(_mlp(k=256, hidden=512), tmp_path)
    before = serialize.model_bytes(model)
    quantize = WeightOnlyQuantizePass(WeightOnlyConfig())
    quantize(model)
    assert quantize.details["bits_per_param"] == 4.5  # 4-bit codes + a float16 scale per 32
    assert serialize.model_bytes(model) < 0.15 * before
    nf4 = WeightOnlyQuantizePass(WeightOnlyConfig(format="nf4"))
    nf4(_load(_mlp(k=256, hidden=512), tmp_path))
    assert 4.12 < nf4.details["bits_per_param"] < 4.14  # type: ignore[operator]


def test_second_run_and_already_quantized_weights_are_left_alone(tmp_path: Path) -> None:
    for fmt, bits in FORMATS:
        model = _load(_mlp(), tmp_path)
        config = WeightOnlyConfig(format=fmt, bits=bits)  # type: ignore[arg-type]
        assert WeightOnlyQuantizePass(config)(model).modified
        again = WeightOnlyQuantizePass(config)
        assert not again(model).modified
        assert again.details["layers"] == 0
    qat = _load(toy.qdq_weight(), tmp_path)
    assert not WeightOnlyQuantizePass(WeightOnlyConfig())(qat).modified


def _single(
    node: onnx.NodeProto,
    inits: list[onnx.TensorProto],
    inputs: list[onnx.ValueInfoProto],
    shape: list[int | str],
    dtype: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    out = helper.make_tensor_value_info(node.output[0], dtype, shape)
    return toy._model(helper.make_graph([node], "one", inputs, [out], inits))


def test_unsupported_patterns_are_left_alone(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])
    w = helper.make_tensor_value_info("w", TensorProto.FLOAT, [16, 8])
    cases = {
        "dynamic weight": _single(helper.make_node("MatMul", ["x", "w"], ["y"]), [], [x, w], ["batch", 8]),
        "float64 weight": _single(
            helper.make_node("MatMul", ["x", "h"], ["y"]),
            [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float64), "h")],
            [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 16])],
            ["batch", 8],
            TensorProto.DOUBLE,
        ),
        "constant A": _single(
            helper.make_node("MatMul", ["c", "x"], ["y"]),
            [numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "c")],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 8])],
            [4, 8],
        ),
        "Gemm transA": _single(
            helper.make_node("Gemm", ["x", "c"], ["y"], transA=1),
            [numpy_helper.from_array(rng.standard_normal((4, 8)).astype(np.float32), "c")],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
            [16, 8],
        ),
        "Gather axis 1": _single(
            helper.make_node("Gather", ["t", "i"], ["y"], axis=1),
            [numpy_helper.from_array(rng.standard_normal((16, 64)).astype(np.float32), "t")],
            [helper.make_tensor_value_info("i", TensorProto.INT64, [3])],
            [16, 3],
        ),
    }
    for name, proto in cases.items():
        model = _load(proto, tmp_path, f"{name.replace(' ', '_')}.onnx")
        assert not WeightOnlyQuantizePass(WeightOnlyConfig())(model).modified, name
    subgraph = _load(toy.with_if_subgraph(), tmp_path, "if.onnx")
    assert not WeightOnlyQuantizePass(WeightOnlyConfig())(subgraph).modified


def test_excluded_nodes_op_types_and_per_channel(tmp_path: Path) -> None:
    model = _load(_mlp(k=100), tmp_path)
    layers, skipped = plan_layers(model.graph, WeightOnlyConfig(exclude=("fc2",), op_types=("MatMul",)))
    assert [layer.node.name for layer in layers] == ["fc1"] and skipped == {"excluded by name": 1}
    assert WeightOnlyConfig(block_size=0).block_for(100) == 128
    for fmt in ("matmul_nbits", "qdq"):
        model = _load(_mlp(k=100), tmp_path)
        quantize = WeightOnlyQuantizePass(WeightOnlyConfig(format=fmt, block_size=0))  # type: ignore[arg-type]
        quantize(model)
        assert quantize.details["layers"] == 3
        serialize.check_model(model)
    nf4 = WeightOnlyQuantizePass(WeightOnlyConfig(format="nf4"))
    nf4(_load(_mlp(k=100), tmp_path))
    assert nf4.details["skipped"] == {"K not a multiple of the nf4 block size": 2} and nf4.details["layers"] == 1


def test_embeddings_become_gather_block_quantized(tmp_path: Path) -> None:
    ids = np.random.default_rng(4).integers(0, 100, (3, 5)).astype(np.int64)
    for bits, symmetric in ((4, True), (4, False), (8, True), (8, False)):
        model = _load(_embedding(), tmp_path)
        table = model.graph.initializers["table"].const_value.numpy().copy()
        quantize = WeightOnlyQuantizePass(WeightOnlyConfig(bits=bits, symmetric=symmetric))  # type: ignore[arg-type]
        assert quantize(model).modified
        expected = quant_blocks.quantize_int_blocks(
            table.T, bits, 32, symmetric=symmetric, clip_ratios=WeightOnlyConfig().clip_ratios(), scale_type="float16"
        ).dequantize()
        got = runtime.run(runtime.create_session(model), {"ids": ids})["y"]
        np.testing.assert_allclose(got, expected.T[ids], rtol=1e-6, atol=1e-6)
        assert quantize.details["embeddings"] == 1 and "table" not in model.graph.initializers
        assert quantize.details["ort_cpu_kernels"] == {f"GatherBlockQuantized(bits={bits})": 1}


def test_shared_weights_are_quantized_once(tmp_path: Path) -> None:
    model = _load(toy.shared_weight(64), tmp_path)
    quantize = WeightOnlyQuantizePass(WeightOnlyConfig())
    # W is also read by a Transpose, which keeps it in float: quantizing the MatMul would store it twice.
    assert not quantize(model).modified
    assert quantize.details["skipped"] == {
        "weight also read by other ops": 1,
        "weight is not a constant float32/float16 matrix": 1,  # the MatMul reading Transpose(W)
    }
    two = _load(_two_readers(), tmp_path, "two.onnx")
    quantize = WeightOnlyQuantizePass(WeightOnlyConfig())
    quantize(two)
    assert quantize.details["layers"] == 2 and len(two.graph.initializers) == 2  # one B + one float16 scale set
    assert quantize.details["bytes_before"] == 64 * 64 * 4 and quantize.details["per_layer"][0]["weight"] == "W"
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    runtime.run(runtime.create_session(two), {"x": x})


def _two_readers() -> onnx.ModelProto:
    w = np.random.default_rng(6).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("MatMul", ["a", "W"], ["y"])],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(w, "W")],
    )
    return toy._model(graph)


def _linear(k: int = 64, n: int = 48) -> onnx.ModelProto:
    w = np.random.default_rng(9).standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
        [numpy_helper.from_array(w, "W")],
    )
    return toy._model(graph)


@pytest.mark.parametrize("fmt", ["matmul_nbits", "nf4"])
def test_gptq_beats_round_to_nearest_on_the_layer_output(fmt: str, tmp_path: Path) -> None:
    """Synthetic statistics (strongly correlated inputs) stand in for calibration: no session needed."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((512, 8)) @ rng.standard_normal((8, 64)) + 0.1 * rng.standard_normal((512, 64))
    x = x.astype(np.float32)
    expected = runtime.run(runtime.create_session(_load(_linear(), tmp_path)), {"x": x})["y"]
    errors = {}
    for method in ("rtn", "gptq"):
        model = _load(_linear(), tmp_path)
        quantize = WeightOnlyQuantizePass(
            WeightOnlyConfig(format=fmt, method=method),
            {"x": x.T @ x / len(x)},  # type: ignore[arg-type]
        )
        quantize(model)
        got = runtime.run(runtime.create_session(model), {"x": x})["y"]
        errors[method] = float(np.mean((got - expected) ** 2))
        layer = quantize.details["per_layer"][0]  # type: ignore[index]
        assert quantize.details["method"] == method
        if method == "gptq":
            assert layer["gptq_error"] < 0.5 * layer["rtn_error"]
    assert errors["gptq"] < 0.5 * errors["rtn"]


def test_gptq_act_order_is_a_permutation_and_helps_where_energy_is_uneven() -> None:
    """Identity order reproduces plain GPTQ; inputs whose energy varies by orders of magnitude (an LLM's outlier
    channels) gain from going first, while every row still snaps onto its own block's scale."""
    from graphopt.numerics import gptq as gptq_module

    rng = np.random.default_rng(3)
    k, n = 128, 96
    gain = np.exp(rng.uniform(-3, 3, k)).astype(np.float32)  # per-input scale spread ~400x
    x = (rng.standard_normal((2048, 16)) @ rng.standard_normal((16, k)) + rng.standard_normal((2048, k))) * gain
    hessian = (x.T @ x / len(x)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    grid = quant_blocks.quantize_int_blocks(w, 4, 32, symmetric=True, clip_ratios=(1.0,))
    _, u = gptq_module.prepare(hessian, 0.01, ordered=False)
    plain = gptq_module.gptq(w, u, grid)
    same = gptq_module.gptq(w, u, grid, np.arange(k))
    np.testing.assert_array_equal(plain, same)
    order, u_ordered = gptq_module.prepare(hessian, 0.01, ordered=True)
    assert order is not None and sorted(order) == list(range(k)) and not np.array_equal(order, np.arange(k))
    ordered = gptq_module.gptq(w, u_ordered, grid, order)
    np.testing.assert_array_equal(grid.encode(ordered).dequantize(), ordered)  # on the grid, scales unchanged
    errors = {name: gptq_module.output_error(w, approx, hessian) for name, approx in
              (("rtn", grid.dequantize()), ("plain", plain), ("ordered", ordered))}  # fmt: skip
    assert errors["ordered"] < errors["plain"] < errors["rtn"]


def test_gptq_calibration_streams_hessians_and_needs_data(tmp_path: Path) -> None:
    model = _load(_mlp(), tmp_path)
    assert collect_hessians(model, None, WeightOnlyConfig()) is None  # rtn needs no data
    with pytest.raises(DataError, match="pass 'weight_only' needs calibration data"):
        collect_hessians(model, None, WeightOnlyConfig(method="gptq"))
    hessians = collect_hessians(model, DataSpec(samples=16, batch_size=4), WeightOnlyConfig(method="gptq"))
    assert hessians is not None and set(hessians) == {"x", "r", "s"}
    x = np.concatenate(list(_random_inputs(model, 16, 4)))
    np.testing.assert_allclose(hessians["x"], x.T @ x / len(x), rtol=1e-4, atol=1e-5)
    result = graphopt.optimize(model, ["weight_only:method=gptq"], calibration=DataSpec(samples=16, batch_size=4))
    assert result.report.passes[0].details["method"] == "gptq"


def test_method_auto_runs_gptq_when_given_data_and_rounds_to_nearest_otherwise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = _load(_mlp(), tmp_path)
    auto = WeightOnlyConfig(method="auto")
    assert not auto.needs_data and "GPTQ" in auto.without_data
    assert collect_hessians(model, None, auto) is None
    with caplog.at_level("WARNING"):
        plain = graphopt.optimize(model, ["weight_only:method=auto"])
    assert plain.report.passes[0].details["method"] == "rtn"
    assert any("no calibration data: weight_only rounds to nearest" in r.message for r in caplog.records)
    given = graphopt.optimize(model, ["weight_only:method=auto"], calibration=DataSpec(samples=16, batch_size=4))
    assert given.report.passes[0].details["method"] == "gptq"


def _random_inputs(model: ir.Model, samples: int, batch: int) -> list[np.ndarray]:
    from graphopt.calibration.sources import input_specs, iter_batches

    return [b["x"] for b in iter_batches(DataSpec(samples=samples, batch_size=batch), input_specs(model))]


def test_pipeline_saves_checks_and_reloads(tmp_path: Path) -> None:
    result = graphopt.optimize(_load(_mlp(), tmp_path), ["weight_only"])
    assert result.report.verification is not None and result.report.verification.passed
    saved = io.save_model(result.model, tmp_path / "out.onnx")
    reloaded = io.load_model(saved.path)
    assert any(n.op_type == "MatMulNBits" for n in reloaded.graph)


def test_external_weights_are_read_and_released_one_at_a_time(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    saved = io.save_model(_load(_mlp(k=256, hidden=512), tmp_path), source / "big.onnx", external_data=True)
    model = io.load_model(saved.path)
    tensors = {
        n: v.const_value for n, v in model.graph.initializers.items() if isinstance(v.const_value, ir.ExternalTensor)
    }
    assert set(tensors) == {"W1", "W2", "W3"}  # the small bias is stored inline
    x = np.random.default_rng(8).standard_normal((2, 256)).astype(np.float32)
    expected = runtime.run(runtime.create_session(model), {"x": x})["y"]
    for tensor in tensors.values():
        tensor.release()
    WeightOnlyQuantizePass(WeightOnlyConfig(format="nf4"))(model)
    assert all(t.raw is None for t in tensors.values())  # each weight was unmapped after use
    out = io.save_model(model, tmp_path / "q.onnx", external_data=True)
    assert out.data_path is not None and out.bytes_on_disk < 0.2 * saved.bytes_on_disk
    got = runtime.run(runtime.create_session(io.load_model(out.path)), {"x": x})["y"]
    assert np.abs(got - expected).max() < 0.15 * np.abs(expected).max()


def test_qdq_opset_is_raised_only_when_every_op_survives(tmp_path: Path) -> None:
    model = _load(_mlp(opset=13), tmp_path)
    WeightOnlyQuantizePass(WeightOnlyConfig(format="qdq"))(model)
    assert model.opset_imports[""] == 21
    serialize.check_model(model)
    old = _mlp(opset=11)
    old.graph.node.append(helper.make_node("ReduceMean", ["y"], ["m"], axes=[1], name="mean"))
    old.graph.output.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, ["batch", 1]))
    model = _load(old, tmp_path, "old.onnx")
    message = (
        "weight_only: format 'qdq' needs opset 21 (blocked DequantizeLinear), but the model is at opset 11 and "
        "cannot simply be raised: mean (ReduceMean) uses attribute(s) axes that opset 21 no longer has. "
        "Re-export the model with opset_version=21, or use format 'matmul_nbits'."
    )
    with pytest.raises(PassError) as info:
        WeightOnlyQuantizePass(WeightOnlyConfig(format="qdq"))(model)
    assert str(info.value) == message
    assert model.opset_imports[""] == 11 and WeightOnlyQuantizePass(WeightOnlyConfig())(model).modified


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block_size": 48}, "block_size must be 0 (per output channel) or a power of two >= 16; got 48."),
        ({"block_size": 8}, "block_size must be 0 (per output channel) or a power of two >= 16; got 8."),
        ({"bits": 3}, "bits: 3 is not one of 4, 8."),
        ({"format": "int4"}, "format: 'int4' is not one of 'matmul_nbits', 'qdq', 'nf4', 'fp4'."),
        ({"format": "nf4", "bits": 8}, "format 'nf4' stores 4-bit floats; set bits: 4 (got 8)."),
        ({"format": "fp4", "block_size": 0}, "format 'fp4' needs blocks along K; block_size 0 is for matmul_nbits"),
        ({"method": "awq"}, "method: 'awq' is not one of 'rtn', 'gptq', 'auto'."),
        ({"clip_min": 0}, "clip_min must be in (0, 1]; got 0.0."),
        ({"clip_steps": 0}, "clip_steps must be >= 1; got 0."),
        ({"gptq_damp": -1}, "gptq_damp must be > 0; got -1.0."),
        ({"accuracy_level": 5}, "accuracy_level: 5 is not one of 0, 1, 2, 3, 4."),
        ({"scale_type": "bfloat16"}, "scale_type: 'bfloat16' is not one of 'float16', 'float32'."),
        ({"op_types": "MatMul"}, "op_types: expected a list; got 'MatMul'."),
        ({"symmetric": "yes"}, "symmetric: expected bool; got 'yes' (str)."),
        ({"group_size": 32}, "unknown key(s) 'group_size'; valid keys: format, bits, block_size"),
    ],
)
def test_bad_configs(options: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe.make_step("weight_only", options, "recipe")
    assert message in str(info.value)


def test_recipe_builds_the_pass_with_calibration() -> None:
    step = recipe.parse_pass_arg("weight_only:format=nf4,method=gptq")
    assert step.config == WeightOnlyConfig(format="nf4", method="gptq")
    assert graphopt.registry.get_spec("weight_only").needs_calibration


@pytest.mark.slow
def test_a_3gb_model_is_quantized_in_bounded_memory(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Generated 3.2 GB model with external data: load, quantize and save stay 1.5 GB above baseline."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("takes minutes: run it with -m slow (the bench measures it too)")
    if shutil.disk_usage(tmp_path).free < 8e9:
        pytest.skip("needs 8 GB of free disk")
    from tests.harness.large_models import make_large_model, run_child

    source = make_large_model(tmp_path, layers=12)
    assert source.stat().st_size + (tmp_path / "large.onnx.data").stat().st_size >= 3e9
    (tmp_path / "out").mkdir()
    figures = run_child("graphopt", source, tmp_path / "out" / "q.onnx")
    assert figures["peak"] - figures["baseline"] <= 1536
    written = sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert written < 0.15 * 3.2e9


def test_fallback_tries_gptq_before_float_layers(tmp_path: Path) -> None:
    """Correlated inputs: GPTQ is clearly better than round-to-nearest, at the same size and speed."""
    rng = np.random.default_rng(7)
    mix = rng.standard_normal((8, 64))

    def inputs(n: int) -> np.ndarray:
        return (rng.standard_normal((n, 8)) @ mix + 0.1 * rng.standard_normal((n, 64))).astype(np.float32)

    np.savez(tmp_path / "calib.npz", x=inputs(256))
    np.savez(tmp_path / "check.npz", x=inputs(64))
    path = tmp_path / "linear.onnx"
    toy.save(_linear(), path)

    def run(method: str, budget: dict[str, float], calibrated: bool = True) -> graphopt.pipeline.Result:
        recipe = {
            "passes": [f"weight_only:method={method}"],
            "verify": {"data": str(tmp_path / "check.npz"), "samples": 64, "batch_size": 32, "latency_runs": 0},
            "budget": budget,
        }
        calibration = DataSpec(source=str(tmp_path / "calib.npz")) if calibrated else None
        return graphopt.optimize(path, recipe, calibration=calibration)

    rtn = run("rtn", {}).report.verification.outputs[0].rel_l2
    gptq = run("gptq", {}).report.verification.outputs[0].rel_l2
    assert gptq < 0.7 * rtn
    result = run("rtn", {"max_rel_l2": (rtn + gptq) / 2})
    fallback = result.report.fallback
    assert fallback["passed"] and fallback["float_nodes"] == [] and fallback["changed"] == {"method": "gptq"}
    assert result.report.passes[0].details["method"] == "gptq"
    # Without calibration data GPTQ cannot run: the layer is kept in float instead.
    fallback = run("rtn", {"max_rel_l2": (rtn + gptq) / 2}, calibrated=False).report.fallback
    assert fallback["alternatives"] == {} and fallback["float_nodes"] == ["fc"]


def _tied(d: int = 64, v: int = 96) -> onnx.ModelProto:
    """ORT GenAI's tied embeddings: ids -> Gather(Transpose(W)) -> ... -> MatMul(h, W), W [D, V] read by both."""
    w = np.random.default_rng(11).standard_normal((d, v)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Transpose", ["W"], ["table"], name="embed_transpose", perm=[1, 0]),
            helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "W"], ["logits"], name="lm_head"),
        ],
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", v])],
        [numpy_helper.from_array(w, "W")],
    )
    return toy._model(graph)


def test_tied_embedding_and_lm_head_are_quantized_with_one_set_of_codes(tmp_path: Path) -> None:
    """The table and the LM head are one weight: both are quantized from the same blocks, none left in float."""
    untouched = _load(_tied(), tmp_path, "default.onnx")
    by_default = WeightOnlyQuantizePass(WeightOnlyConfig(bits=4))
    assert not by_default(untouched).modified  # off by default: the table and the LM head stay float
    assert by_default.details["skipped"] == {"weight also read by other ops": 1}
    model = _load(_tied(), tmp_path)
    w = model.graph.initializers["W"].const_value.numpy().copy()
    quantize = WeightOnlyQuantizePass(WeightOnlyConfig(bits=4, tied=True))
    assert quantize(model).modified
    ops = [n.op_type for n in model.graph]
    assert "GatherBlockQuantized" in ops and "MatMulNBits" in ops and "Transpose" not in ops
    assert "W" not in model.graph.initializers
    codes = [v for v in model.graph.initializers.values() if v.dtype in (ir.DataType.UINT8, ir.DataType.INT4)]
    assert len(codes) == 1  # the table reads the head's B through a Reshape: one copy of the codes in the file
    assert all(
        v.const_value.dtype != ir.DataType.FLOAT or v.const_value.size < 100 for v in model.graph.initializers.values()
    )
    blocks = quant_blocks.quantize_int_blocks(
        w, 4, 32, symmetric=True, clip_ratios=WeightOnlyConfig().clip_ratios(), scale_type="float16"
    ).dequantize()  # [D, V], blocks along D: what both readers use
    ids = np.random.default_rng(12).integers(0, 96, (2, 5)).astype(np.int64)
    got = runtime.run(runtime.create_session(model), {"ids": ids})["logits"]
    expected = np.maximum(blocks.T[ids], 0) @ blocks
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3)


def test_a_tied_weight_takes_gptq_from_its_lm_head(tmp_path: Path) -> None:
    """The Gather comes first in the graph but has no Hessian: the shared blocks are GPTQ-rounded for the head."""
    model = _load(_tied(), tmp_path)
    head = next(n for n in model.graph if n.op_type == "MatMul")
    x = np.random.default_rng(13).standard_normal((256, 8)) @ np.random.default_rng(14).standard_normal((8, 64))
    quantize = WeightOnlyQuantizePass(
        WeightOnlyConfig(bits=4, tied=True, method="gptq"), {head.inputs[0].name: (x.T @ x / len(x)).astype(np.float32)}
    )
    assert quantize(model).modified
    [record] = quantize.details["per_layer"]  # type: ignore[misc]
    assert record["name"] == head.name and record["gptq_error"] < record["rtn_error"]
    assert {n.op_type for n in model.graph} >= {"GatherBlockQuantized", "MatMulNBits"}
    # The head is lowered first, yet the table reads its scales: helper nodes stand at the head of the graph.
    serialize.check_model(model)
    ids = np.random.default_rng(15).integers(0, 96, (2, 5)).astype(np.int64)
    assert runtime.run(runtime.create_session(model), {"ids": ids})["logits"].shape == (2, 5, 96)


def test_embedding_bits_give_the_table_its_own_width(tmp_path: Path) -> None:
    """embedding_bits=8: an untied table gets 8 bits beside 4-bit MatMuls; a tied table and LM head get one 8-bit
    copy for both readers (an 8-bit head is both smaller and closer than a second, 4-bit copy)."""
    clips = WeightOnlyConfig().clip_ratios()
    model = _load(_embedding(), tmp_path, "untied.onnx")
    assert WeightOnlyQuantizePass(WeightOnlyConfig(bits=4, embedding_bits=8))(model).modified
    assert next(n for n in model.graph if n.op_type == "GatherBlockQuantized").attributes.get_int("bits") == 8

    model = _load(_tied(), tmp_path)
    w = model.graph.initializers["W"].const_value.numpy().copy()
    quantize = WeightOnlyQuantizePass(WeightOnlyConfig(bits=4, embedding_bits=8, tied=True))
    assert quantize(model).modified
    gather = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph if n.op_type == "MatMulNBits")
    assert gather.attributes.get_int("bits") == 8 and head.attributes.get_int("bits") == 8
    assert head.attributes.get_int("accuracy_level") == 4  # the 8-bit float kernel is the slow one
    assert any("ORT_DISABLE_ALL" in note for note in quantize.details["ort_notes"])  # type: ignore[union-attr]
    assert len(quantize.details["per_layer"]) == 1  # type: ignore[arg-type]  # one quantization for both
    blocks = quant_blocks.quantize_int_blocks(w, 8, 32, symmetric=True, clip_ratios=clips, scale_type="float16")
    table = blocks.dequantize()
    ids = np.random.default_rng(13).integers(0, 96, (2, 5)).astype(np.int64)
    got = runtime.run(runtime.create_session(model), {"ids": ids})["logits"]  # level 4: int8 activations
    expected = np.maximum(table.T[ids], 0) @ table
    np.testing.assert_allclose(got, expected, atol=1e-2 * np.abs(expected).max())


def test_mixed_share_stores_the_layers_that_lose_most_at_8_bits(tmp_path: Path) -> None:
    """Three equal layers; the one whose blocks hold outliers loses the most at 4 bits: it alone fits a third."""
    rng = np.random.default_rng(21)
    heavy = rng.standard_normal((64, 64)) / 8
    heavy[rng.random((64, 64)) < 0.03] *= 20  # an outlier in most blocks of 32 stretches their 4-bit step
    weights = [rng.standard_normal((64, 64)) / 8, heavy, rng.standard_normal((64, 64)) / 8]
    model = _load(toy.matmul_chain(weights), tmp_path)
    quantize = WeightOnlyQuantizePass(WeightOnlyConfig(mixed_share=0.34))
    assert quantize(model).modified
    bits = {n.name: n.attributes.get_int("bits") for n in model.graph if n.op_type == "MatMulNBits"}
    assert bits == {"fc0_MatMulNBits": 4, "fc1_MatMulNBits": 8, "fc2_MatMulNBits": 4}
    assert quantize.details["layers_at_8_bits"] == 1
    assert 4.5 < quantize.details["bits_per_param"] < 6.5  # type: ignore[operator]
    x = rng.standard_normal((4, 64)).astype(np.float32)
    # the 8-bit layer computes its 8-bit weight: compare against numpy on the codes each layer holds
    clips = WeightOnlyConfig().clip_ratios()
    approx = [
        quant_blocks.quantize_int_blocks(
            w.astype(np.float32), b, 32, symmetric=True, clip_ratios=clips, scale_type="float16"
        ).dequantize()
        for w, b in zip(weights, (4, 8, 4), strict=True)
    ]
    got = runtime.run(runtime.create_session(model), {"x": x})["y"]
    expected = x @ approx[0] @ approx[1] @ approx[2]  # the 8-bit layer's kernel takes int8 activations (level 4)
    np.testing.assert_allclose(got, expected, atol=2e-2 * np.abs(expected).max())
    # none fits a share smaller than one layer: all stay at 4 bits
    model = _load(toy.matmul_chain(weights), tmp_path, "small.onnx")
    WeightOnlyQuantizePass(WeightOnlyConfig(mixed_share=0.2))(model)
    assert {n.attributes.get_int("bits") for n in model.graph if n.op_type == "MatMulNBits"} == {4}


def test_the_fallback_widens_layers_to_8_bits_before_leaving_any_in_float(tmp_path: Path) -> None:
    rng = np.random.default_rng(22)
    weights = [rng.standard_normal((64, 64)) / 8 for _ in range(4)]
    path = toy.save(toy.matmul_chain(weights), tmp_path / "chain.onnx")
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((64, 64)).astype(np.float32))

    def run(options: str, budget: dict[str, float]) -> graphopt.pipeline.Result:
        recipe = {
            "passes": [f"weight_only:{options}"],
            "verify": {"data": str(tmp_path / "x.npz"), "samples": 64, "batch_size": 32, "latency_runs": 0},
            "budget": budget,
        }
        return graphopt.optimize(path, recipe)

    four = run("bits=4", {}).report.verification.outputs[0].rel_l2
    quarter = run("mixed_share=0.25", {}).report.verification.outputs[0].rel_l2
    half = run("mixed_share=0.5", {}).report.verification.outputs[0].rel_l2
    assert half < 0.9 * quarter < 0.9 * four
    result = run("bits=4", {"max_rel_l2": (quarter + half) / 2})
    fallback = result.report.fallback
    assert fallback["passed"] and fallback["float_nodes"] == [] and fallback["changed"] == {"mixed_share": 0.5}
    # 0.1 widens no layer of four equal ones (each is a quarter): it is not run; 0.25 is and misses
    assert list(fallback["alternatives"]) == ["mixed_share=0.25", "mixed_share=0.5"]
    assert result.report.passes[0].details["layers_at_8_bits"] == 2
    assert "options changed: mixed_share=0.5" in result.report.to_markdown()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"mixed_share": 1.5}, "mixed_share must be between 0 and 1; got 1.5."),
        ({"mixed_share": 0.1, "bits": 8}, "mixed_share stores some 4-bit integer layers at 8 bits"),
        ({"mixed_share": 0.1, "format": "nf4"}, "it needs bits: 4 and format matmul_nbits or qdq"),
    ],
)
def test_mixed_share_needs_a_4_bit_integer_format(options: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe.make_step("weight_only", options, "recipe")
    assert message in str(info.value)


def _norm_and_gated_mlp(d: int = 64, f: int = 128, seed: int = 23) -> onnx.ModelProto:
    """LayerNorm -> gate/up MatMuls -> silu(gate) * up -> down MatMul, plus a residual read of the norm's input."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="norm", axis=-1),
            helper.make_node("MatMul", ["n", "Wg"], ["g"], name="gate"),
            helper.make_node("MatMul", ["n", "Wu"], ["u"], name="up"),
            helper.make_node("Sigmoid", ["g"], ["sg"], name="sigmoid"),
            helper.make_node("Mul", ["g", "sg"], ["silu"], name="silu"),
            helper.make_node("Mul", ["silu", "u"], ["h"], name="gated"),
            helper.make_node("MatMul", ["h", "Wd"], ["o"], name="down"),
            helper.make_node("Add", ["x", "o"], ["y"], name="residual"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", d])],
        [
            # a few norm channels far larger than the rest: the activation outliers AWQ protects
            numpy_helper.from_array(np.where(np.arange(d) % 16 == 0, 30.0, 1.0).astype(np.float32), "gamma"),
            numpy_helper.from_array((rng.standard_normal(d) / 10).astype(np.float32), "beta"),
            numpy_helper.from_array((rng.standard_normal((d, f)) / 8).astype(np.float32), "Wg"),
            numpy_helper.from_array((rng.standard_normal((d, f)) / 8).astype(np.float32), "Wu"),
            numpy_helper.from_array((rng.standard_normal((f, d)) / 8).astype(np.float32), "Wd"),
        ],
    )
    return toy._model(graph)


def test_awq_folds_its_scales_exactly_and_lowers_the_output_error(tmp_path: Path) -> None:
    from graphopt.passes.weight_only import awq

    rng = np.random.default_rng(24)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    source = _load(_norm_and_gated_mlp(), tmp_path)
    config = WeightOnlyConfig(awq=True)
    hessians = collect_hessians(source, DataSpec(source=str(tmp_path / "calib.npz")), config)
    assert hessians is not None and len(hessians) == 2  # the norm's output (gate, up) and the gated product (down)
    expected = runtime.run(runtime.create_session(source), {"x": x})["y"]

    # the scaling alone, before any rounding, computes the same function
    scaled = _load(_norm_and_gated_mlp(), tmp_path, "scaled.onnx")
    layers, _ = plan_layers(scaled.graph, config)
    renamed = dict(hessians)
    done = awq.apply(scaled.graph, layers, renamed, config)
    assert sorted(s.fold for s in done) == ["matmul", "norm"] and all(s.alpha > 0 for s in done)
    assert set(renamed) == {"n_awq", "h_awq"}  # scaled tensors renamed, their Hessians with them
    got = runtime.run(runtime.create_session(scaled), {"x": x})["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)  # exact up to float rounding

    def error(options: dict[str, object]) -> float:
        model = _load(_norm_and_gated_mlp(), tmp_path, "q.onnx")
        quantize = WeightOnlyQuantizePass(WeightOnlyConfig(**options), hessians)  # type: ignore[arg-type]
        assert quantize(model).modified
        out = runtime.run(runtime.create_session(model), {"x": x})["y"]
        return float(np.linalg.norm(out - expected) / np.linalg.norm(expected))

    assert error({"awq": True}) < 0.9 * error({})  # 0.102 against 0.118 here
    # the caller's statistics are not changed by the pass (the fallback re-runs it with them)
    assert set(hessians) == {"n", "h"}


def test_awq_leaves_an_input_alone_when_another_op_reads_it(tmp_path: Path) -> None:
    from graphopt.passes.weight_only import awq

    proto = _norm_and_gated_mlp()
    proto.graph.node.append(helper.make_node("ReduceMean", ["n"], ["m"], name="probe"))
    proto.graph.output.append(helper.make_tensor_value_info("m", TensorProto.FLOAT, None))
    model = _load(proto, tmp_path)
    rng = np.random.default_rng(25)
    x = rng.standard_normal((128, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    config = WeightOnlyConfig(awq=True)
    hessians = collect_hessians(model, DataSpec(source=str(tmp_path / "calib.npz")), config)
    layers, _ = plan_layers(model.graph, config)
    done = awq.apply(model.graph, layers, dict(hessians or {}), config)
    assert [s.activation for s in done] == ["h"]  # the gated product only: ReduceMean reads the norm's output


def test_a_tied_lm_head_competes_for_8_bits_with_its_table(tmp_path: Path) -> None:
    model = _load(_tied(), tmp_path)
    quantize = WeightOnlyQuantizePass(WeightOnlyConfig(tied=True, mixed_share=1.0))
    assert quantize(model).modified and quantize.details["layers_at_8_bits"] == 1
    gather = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph if n.op_type == "MatMulNBits")
    assert gather.attributes.get_int("bits") == 8 and head.attributes.get_int("bits") == 8  # one copy, both readers


def test_a_conv_net_is_told_which_pass_compresses_it(tmp_path: Path) -> None:
    """weight_only covers MatMul/Gemm/Gather weights: on a conv net it changes nothing and says quantize's the pass."""
    model = _load(toy.conv_bn(), tmp_path, "conv.onnx")
    quantize = WeightOnlyQuantizePass(WeightOnlyConfig())
    assert not quantize(model).modified
    assert quantize.details["skipped"] == (
        "nothing to quantize: no MatMul/Gemm/Gather with a constant float weight; "
        "its 1 Conv weights are quantize's to compress (static int8)"
    )
