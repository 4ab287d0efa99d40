from __future__ import annotations

from importlib import resources
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
from graphopt.passes.prune import scoring
from graphopt.passes.prune.calibration import LayerStatistics, conv_patches
from graphopt.passes.prune.config import PruneConfig
from graphopt.passes.prune.unstructured import PruneWeightsPass, collect_prune_statistics, prunable_layers
from tests import toy

DATA = Path(str(resources.files("graphopt") / "data"))


def _three_layers(seed: int = 0) -> onnx.ModelProto:
    """Conv [8, 4, 3, 3] -> GlobalAveragePool -> Flatten -> Gemm(transB) [16, 8] -> MatMul [16, 12]."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Conv", ["x", "Wc", "Bc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "Wg", "Bg"], ["h"], name="gemm", transB=1),
        helper.make_node("MatMul", ["h", "Wm"], ["y"], name="matmul"),
    ]
    graph = helper.make_graph(
        nodes,
        "three",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 12])],
        [
            numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "Wc"),
            numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "Bc"),
            numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "Wg"),
            numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "Bg"),
            numpy_helper.from_array(rng.standard_normal((16, 12)).astype(np.float32), "Wm"),
        ],
    )
    return toy._model(graph)


def _load(proto: onnx.ModelProto, tmp_path: Path, name: str = "m.onnx") -> ir.Model:
    return io.load_model(toy.save(proto, tmp_path / name))


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return runtime.run(runtime.create_session(model, optimization="disable"), {"x": x})["y"]


def _numpy_forward(w: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The three-layer model in numpy, to check ONNX Runtime runs exactly the pruned weights."""
    patches = conv_patches(_conv_node(), x)
    conv = patches @ scoring.weight_rows("Conv", w["Wc"]).T + w["Bc"]
    pooled = np.maximum(conv, 0).reshape(len(x), -1, 8).mean(axis=1)
    return (pooled @ w["Wg"].T + w["Bg"]) @ w["Wm"]


def _conv_node() -> ir.Node:
    weight = ir.Value(name="Wc", const_value=ir.tensor(np.zeros((8, 4, 3, 3), np.float32)))
    return ir.node("Conv", [ir.Value(name="x"), weight], {"pads": [1, 1, 1, 1]})


def test_two_four_pattern_along_each_reduction_axis(tmp_path: Path) -> None:
    model = _load(_three_layers(), tmp_path)
    result = PruneWeightsPass(PruneConfig(pattern="n:m"))(model)
    assert result.modified
    w = _weights(model)
    # MatMul B[K, N]: groups of 4 along K; Gemm transB B[N, K]: along K (axis 1);
    # Conv W[O, C, R, S]: 4 consecutive input channels at each kernel position.
    assert np.all((w["Wm"].reshape(4, 4, 12) != 0).sum(axis=1) == 2)
    assert np.all((w["Wg"].reshape(16, 2, 4) != 0).sum(axis=2) == 2)
    assert np.all((w["Wc"] != 0).sum(axis=1) == 2)
    assert np.count_nonzero(w["Bc"]) == 8 and np.count_nonzero(w["Bg"]) == 16  # biases stay dense
    serialize.check_model(model)
    x = np.random.default_rng(1).standard_normal((3, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _numpy_forward(w, x), rtol=1e-4, atol=1e-4)
    assert [v.name for v in model.graph.outputs] == ["y"] and list(model.graph.outputs[0].shape) == ["batch", 12]
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT
    assert not PruneWeightsPass(PruneConfig(pattern="n:m"))(model).modified


def test_magnitude_keeps_the_largest_of_each_group() -> None:
    rows = np.array([[0.1, -3.0, 2.0, 0.5, 1.0, 0.0, -0.2, 4.0]], np.float32)
    np.testing.assert_array_equal(scoring.nm_mask(np.abs(rows), 2, 4), [[0, 1, 1, 0, 1, 0, 0, 1]])
    mask = scoring.unstructured_mask(np.abs(rows), 0.625, per_row=False)
    np.testing.assert_array_equal(mask, [[0, 1, 1, 0, 0, 0, 0, 1]])


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_sparsity(tmp_path: Path, scope: str) -> None:
    model = _load(_three_layers(), tmp_path)
    config = PruneConfig(sparsity=0.7, scope=scope)
    pass_ = PruneWeightsPass(config)
    assert pass_(model).modified
    w = _weights(model)
    fractions = [float(np.mean(w[n] == 0)) for n in ("Wc", "Wg", "Wm")]
    total = sum(int(np.sum(w[n] == 0)) for n in ("Wc", "Wg", "Wm")) / sum(w[n].size for n in ("Wc", "Wg", "Wm"))
    assert total == pytest.approx(0.7, abs=0.01)
    if scope == "layer":
        assert fractions == pytest.approx([0.7] * 3, abs=0.01)
    assert pass_.details["sparsity"] == pytest.approx(total, abs=1e-3)
    layer = pass_.details["layers"]["Wm"]  # type: ignore[index]
    assert layer["coo_bytes"] == np.count_nonzero(w["Wm"]) * 12 and layer["dense_bytes"] == w["Wm"].nbytes
    assert not PruneWeightsPass(config)(model).modified


def test_layers_left_dense(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "Wstem"], ["c"], name="stem"),  # one input channel: no 2:4 groups
            helper.make_node("Flatten", ["c"], ["f"]),
            helper.make_node("MatMul", ["f", "W"], ["a"], name="shared_1"),
            helper.make_node("MatMul", ["a", "W"], ["b"], name="shared_2"),  # W is read twice
            helper.make_node("Transpose", ["b"], ["b_t"]),
            helper.make_node("MatMul", ["b", "b_t"], ["y"], name="activations"),  # no constant weight
        ],
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [
            numpy_helper.from_array(rng.standard_normal((8, 1, 3, 3)).astype(np.float32), "Wstem"),
            numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "W"),
        ],
    )
    model = _load(toy._model(graph), tmp_path)
    assert prunable_layers(model.graph, PruneConfig(pattern="n:m")) == []
    assert not PruneWeightsPass(PruneConfig(pattern="n:m"))(model).modified
    assert [layer.node.name for layer in prunable_layers(model.graph, PruneConfig())] == ["stem"]


def test_exclusions(tmp_path: Path) -> None:
    model = _load(_three_layers(), tmp_path)
    config = PruneConfig(exclude=("conv", "W[gm]*"))
    assert prunable_layers(model.graph, config) == []
    layers = prunable_layers(model.graph, PruneConfig(exclude_op_types=("Conv", "Gemm")))
    assert [layer.weight.name for layer in layers] == ["Wm"]


def test_wanda_keeps_weights_of_loud_inputs(tmp_path: Path) -> None:
    model = _load(_three_layers(), tmp_path)
    layers = prunable_layers(model.graph, PruneConfig(pattern="n:m", method="wanda"))
    norms = np.ones(16)
    norms[::4] = 1e6  # the first input of every group of 4 is huge: Wanda must keep it
    stats = {layer.key: LayerStatistics(np.ones(layer.rows().shape[1])) for layer in layers}
    matmul = next(layer for layer in layers if layer.node.name == "matmul")
    stats[matmul.key] = LayerStatistics(norms)
    assert PruneWeightsPass(PruneConfig(pattern="n:m", method="wanda"), stats)(model).modified
    assert np.all(_weights(model)["Wm"][::4] != 0)


def test_sparsegpt_reconstructs_better_than_magnitude() -> None:
    rng = np.random.default_rng(3)
    mixing = rng.standard_normal((32, 32))
    x = rng.standard_normal((4000, 32)) @ mixing  # correlated inputs, where reconstruction pays
    rows = rng.standard_normal((16, 32))
    dense = x @ rows.T
    magnitude = rows * scoring.nm_mask(np.abs(rows), 2, 4)
    updated = scoring.sparsegpt(rows, x.T @ x, n=2, m=4, block_size=8)
    assert scoring.nm_satisfied(updated, 2, 4)

    def error(w: np.ndarray) -> float:
        return float(np.linalg.norm(x @ w.T - dense) / np.linalg.norm(dense))

    assert error(updated) < 0.8 * error(magnitude)
    unstructured = scoring.sparsegpt(rows, x.T @ x, sparsity=0.5, block_size=8)
    assert np.mean(unstructured == 0) >= 0.5


def test_data_methods_calibrate_in_a_pipeline(tmp_path: Path) -> None:
    for method in ("wanda", "sparsegpt"):
        model = _load(_three_layers(), tmp_path)
        records = graphopt.Pipeline(recipe.parse_passes([f"prune:pattern=n:m,method={method}"]), check=True).run(
            model, calibration=DataSpec(samples=16, batch_size=4)
        )
        assert records[0].modified and records[0].details["layers_pruned"] == 3
        assert records[0].details["sparsity"] == 0.5
    with pytest.raises(DataError, match="pass 'prune' needs calibration data"):
        graphopt.optimize(_load(_three_layers(), tmp_path), ["prune:method=wanda"])
    with pytest.raises(PassError, match="method=sparsegpt has no calibration statistics"):
        PruneWeightsPass(PruneConfig(method="sparsegpt"))(_load(_three_layers(), tmp_path))
    assert collect_prune_statistics(_load(_three_layers(), tmp_path), None, PruneConfig()) == {}


def test_postcondition_catches_a_broken_pattern(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scoring, "nm_mask", lambda scores, n, m: np.ones_like(scores, dtype=bool))
    with pytest.raises(PassError, match=r"weight 'W.' of .* breaks the 2:4 pattern"):
        PruneWeightsPass(PruneConfig(pattern="n:m"))(_load(_three_layers(), tmp_path))


def test_pattern_written_as_its_numbers() -> None:
    """`--pass prune:pattern=2:4` is n:m with n=2, m=4 (YAML would have read 2:4 as the number 124)."""
    config = recipe.parse_pass_arg("prune:pattern=2:4").config
    assert (config.pattern, config.n, config.m) == ("n:m", 2, 4)
    assert recipe.parse_pass_arg("prune:pattern=1:8").config.m == 8


def test_prune_then_quantize_keeps_zeros() -> None:
    """Pruning runs before quantization, and symmetric int8 weights keep every zero."""
    model = io.load_model(DATA / "digits_cnn.onnx")
    steps = recipe.parse_passes(["fold", "prune:pattern=n:m", "quantize"])
    records = graphopt.Pipeline(steps, check=True).run(
        model, calibration=DataSpec(source=str(DATA / "digits_calib.npz"), samples=64, batch_size=32)
    )
    pruned = records[1].details["layers"]
    assert len(pruned) == 6  # 5 Convs with 32/64 input channels and the Gemm; the stem has 1
    stored = {n: v.const_value.numpy() for n, v in model.graph.initializers.items() if n.endswith("_quantized")}
    for name in pruned:
        quantized = stored[f"{name}_quantized"]
        trans_b = quantized.ndim == 2  # the Gemm weight is [out, in]
        op = "Gemm" if quantized.ndim == 2 else "Conv"
        assert scoring.nm_satisfied(scoring.weight_rows(op, quantized, trans_b=trans_b), 2, 4), name
        assert np.mean(quantized == 0) >= 0.5


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sparsity": 1.5}, "sparsity must be in [0, 1); got 1.5"),
        ({"n": 4, "m": 4}, "n:m needs 0 < n < m; got n=4, m=4"),
        ({"scope": "global", "method": "wanda"}, "it needs method=magnitude, not wanda"),
        ({"scope": "global", "pattern": "n:m"}, "scope=global applies to pattern=unstructured only"),
        ({"pattern": "blocks"}, "pattern must be 'unstructured', 'n:m' or numbers such as '2:4'; got 'blocks'"),
        ({"pattern": "4:2"}, "n:m needs 0 < n < m; got n=4, m=2"),
        ({"method": "obs"}, "'obs' is not one of 'magnitude', 'wanda', 'sparsegpt'"),
        ({"op_types": ["Add"]}, "op_types ['Add'] cannot be pruned; choose from MatMul, Gemm, Conv"),
        ({"block_size": 0}, "block_size must be >= 1; got 0"),
        ({"exclude": "fc"}, "exclude: expected a list; got 'fc'"),
        ({"ratio": 0.5}, "unknown key(s) 'ratio'"),
    ],
)
def test_bad_configs(options: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe.make_step("prune", options, "recipe")
    assert message in str(info.value)
