from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphopt
from graphopt import io, recipe, runtime, serialize, verify
from graphopt.calibration.sources import DataSpec
from graphopt.errors import DataError, PassError, RecipeError
from graphopt.passes.prune.groups import consumer_weight_axis
from graphopt.passes.prune.structured import (
    HISTORY_KEY,
    PruneStructuredConfig,
    PruneStructuredPass,
    find_groups,
    plan,
)
from graphopt.passes.prune.surgery import kept_elements
from tests import toy

DATA = Path(str(resources.files("graphopt") / "data"))
EXACT = PruneStructuredConfig(round_to=1)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def _mlp(hidden: int = 12, seed: int = 0) -> onnx.ModelProto:
    """x[batch, 8] -> MatMul -> Add -> Relu -> MatMul -> Add -> y[batch, 6]."""
    rng = np.random.default_rng(seed)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["r"]),
            helper.make_node("MatMul", ["r", "W2"], ["o"], name="fc2"),
            helper.make_node("Add", ["o", "b2"], ["y"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
        [
            _init("W1", rng.standard_normal((8, hidden))),
            _init("b1", rng.standard_normal(hidden)),
            _init("W2", rng.standard_normal((hidden, 6))),
            _init("b2", rng.standard_normal(6)),
        ],
    )
    return toy._model(graph)


def _residual_cnn() -> onnx.ModelProto:
    """stem Conv-BN-Relu, a two-conv block added back onto it, pooling, Flatten and Gemm."""
    rng = np.random.default_rng(1)

    def bn(prefix: str, channels: int) -> list[onnx.TensorProto]:
        return [
            _init(f"{prefix}_scale", rng.uniform(0.5, 1.5, channels)),
            _init(f"{prefix}_bias", rng.standard_normal(channels)),
            _init(f"{prefix}_mean", rng.standard_normal(channels) * 0.1),
            _init(f"{prefix}_var", rng.uniform(0.5, 1.5, channels)),
        ]

    def bn_node(prefix: str, x: str, y: str) -> onnx.NodeProto:
        names = [f"{prefix}_{p}" for p in ("scale", "bias", "mean", "var")]
        return helper.make_node("BatchNormalization", [x, *names], [y])

    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W0"], ["c0"], name="stem", pads=[1, 1, 1, 1]),
            bn_node("bn0", "c0", "n0"),
            helper.make_node("Relu", ["n0"], ["r0"]),
            helper.make_node("Conv", ["r0", "Wa", "Ba"], ["ca"], name="conv_a", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["ca"], ["ra"]),
            helper.make_node("Conv", ["ra", "Wb"], ["cb"], name="conv_b"),
            bn_node("bnb", "cb", "nb"),
            helper.make_node("Add", ["nb", "r0"], ["s"]),
            helper.make_node("Relu", ["s"], ["rs"]),
            helper.make_node("GlobalAveragePool", ["rs"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "Wf", "bf"], ["y"], name="fc", transB=1),
        ],
        "residual_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        [
            _init("W0", rng.standard_normal((8, 3, 3, 3))),
            *bn("bn0", 8),
            _init("Wa", rng.standard_normal((6, 8, 3, 3))),
            _init("Ba", rng.standard_normal(6)),
            _init("Wb", rng.standard_normal((8, 6, 1, 1))),
            *bn("bnb", 8),
            _init("Wf", rng.standard_normal((5, 8))),
            _init("bf", rng.standard_normal(5)),
        ],
    )
    return toy._model(graph)


def _depthwise() -> onnx.ModelProto:
    """A MobileNet block: 1x1 Conv -> Relu -> depthwise 3x3 Conv -> Relu -> 1x1 Conv."""
    rng = np.random.default_rng(7)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W1"], ["a"], name="expand"),
            helper.make_node("Relu", ["a"], ["ra"]),
            helper.make_node("Conv", ["ra", "Wd", "Bd"], ["d"], name="depthwise", group=8, pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["d"], ["rd"]),
            helper.make_node("Conv", ["rd", "W2"], ["y"], name="project"),
        ],
        "depthwise",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6, 6, 6])],
        [
            _init("W1", rng.standard_normal((8, 4, 1, 1))),
            _init("Wd", rng.standard_normal((8, 1, 3, 3))),
            _init("Bd", rng.standard_normal(8)),
            _init("W2", rng.standard_normal((6, 8, 1, 1))),
        ],
    )
    return toy._model(graph)


def _attention(d_model: int = 16, heads: int = 4) -> onnx.ModelProto:
    """Self-attention with q/k/v/o projections; the head split's target is a Concat of Shape and a constant."""
    rng = np.random.default_rng(2)
    d_head = d_model // heads
    nodes = [
        helper.make_node("Shape", ["x"], ["bs"], start=0, end=2),
        helper.make_node("Concat", ["bs", "heads_dims"], ["split_shape"], axis=0),
    ]
    for p in "qkv":
        nodes += [
            helper.make_node("MatMul", ["x", f"W{p}"], [f"{p}m"], name=f"{p}_proj"),
            helper.make_node("Add", [f"{p}m", f"b{p}"], [f"{p}a"]),
            helper.make_node("Reshape", [f"{p}a", "split_shape"], [f"{p}h"]),
        ]
    nodes += [
        helper.make_node("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["vh"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["qt", "kt"], ["scores"]),
        helper.make_node("Mul", ["scores", "scale"], ["scaled"]),
        helper.make_node("Softmax", ["scaled"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "vt"], ["ctx"]),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"]),
        helper.make_node("MatMul", ["merged", "Wo"], ["om"], name="o_proj"),
        helper.make_node("Add", ["om", "bo"], ["y"]),
    ]
    inits = [_init(f"W{p}", rng.standard_normal((d_model, d_model)) / 4) for p in "qkvo"]
    inits += [_init(f"b{p}", rng.standard_normal(d_model) / 4) for p in "qkvo"]
    inits += [
        numpy_helper.from_array(np.array([heads, d_head], np.int64), "heads_dims"),
        numpy_helper.from_array(np.array([0, 0, d_model], np.int64), "merge_shape"),
        _init("scale", np.array(d_head**-0.5)),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d_model])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d_model])],
        inits,
    )
    return toy._model(graph)


def _load(proto: onnx.ModelProto, tmp_path: Path, name: str = "m.onnx") -> ir.Model:
    return io.load_model(toy.save(proto, tmp_path / name))


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    return runtime.run(runtime.create_session(model, optimization="disable"), {"x": x})["y"]


def _zeroed_reference(model: ir.Model, config: PruneStructuredConfig) -> ir.Model:
    """The dense model with the consumers' weights zeroed for the channels the plan removes.

    Removing channels must compute exactly this: nothing downstream sees them any more.
    """
    chosen = plan(model, find_groups(model, config), config, {})
    for group, kept in chosen:
        removed = np.setdiff1d(np.arange(group.channels), kept)
        for node, member in group.consumers:
            weight = node.inputs[1]
            array = weight.const_value.numpy().copy()
            index = [slice(None)] * array.ndim
            index[consumer_weight_axis(node)] = kept_elements(removed, group.unit(member.scale))
            array[tuple(index)] = 0.0
            weight.const_value = ir.tensor(array, name=weight.name)
    return model


@pytest.mark.parametrize(
    ("builder", "shape", "groups", "kinds"),
    [
        (_mlp, (5, 8), 1, ["mlp"]),
        (_residual_cnn, (2, 3, 6, 6), 2, ["conv", "conv"]),
        (_attention, (2, 7, 16), 1, ["heads"]),
        (_depthwise, (2, 4, 6, 6), 1, ["conv"]),
    ],
)
def test_pruning_equals_zeroing_the_removed_channels(
    tmp_path: Path, builder: object, shape: tuple[int, ...], groups: int, kinds: list[str]
) -> None:
    model = _load(builder(), tmp_path)  # type: ignore[operator]
    reference = _zeroed_reference(model.clone(), EXACT)
    pass_ = PruneStructuredPass(EXACT)
    assert pass_(model).modified
    serialize.check_model(model)
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _run(reference, x), rtol=1e-4, atol=1e-5)
    assert [v.name for v in model.graph.outputs] == ["y"] and model.graph.outputs[0].dtype == ir.DataType.FLOAT
    details = pass_.details
    assert details["groups_pruned"] == groups
    assert [g["kind"] for g in details["groups"].values()] == kinds  # type: ignore[union-attr]
    assert details["parameters_after"] < details["parameters_before"]  # type: ignore[operator]
    assert not PruneStructuredPass(EXACT)(model).modified


def test_shapes_and_weights_shrink_consistently(tmp_path: Path) -> None:
    model = _load(_residual_cnn(), tmp_path)
    PruneStructuredPass(EXACT)(model)
    w = {n: v.const_value.shape for n, v in model.graph.initializers.items()}
    # Tied group (stem + conv_b, through the residual Add): 8 -> 4; conv_a's group: 6 -> 3.
    assert w["W0"] == (4, 3, 3, 3) and w["Wb"] == (4, 3, 1, 1) and w["Wa"] == (3, 4, 3, 3) and w["Wf"] == (5, 4)
    assert w["Ba"] == (3,) and w["bn0_var"] == (4,) and w["bnb_scale"] == (4,)
    values = {out.name: out for node in model.graph for out in node.outputs}
    assert list(values["s"].shape) == ["batch", 4, 6, 6] and list(values["f"].shape) == ["batch", 4]


def test_heads_are_removed_whole(tmp_path: Path) -> None:
    model = _load(_attention(), tmp_path)
    pass_ = PruneStructuredPass(EXACT)
    pass_(model)
    w = {n: v.const_value.shape for n, v in model.graph.initializers.items()}
    assert w["Wq"] == (16, 8) and w["bk"] == (8,) and w["Wo"] == (8, 16)
    group = next(iter(pass_.details["groups"].values()))  # type: ignore[union-attr]
    assert (group["channels_before"], group["channels_after"], group["unit"]) == (4, 2, 4)
    targets = [n.inputs[1] for n in model.graph if n.op_type == "Reshape"]
    assert all(t.producer() is not None and t.producer().op_type == "Concat" for t in targets[:3])
    # The split target now holds 2 heads; the merge target keeps its 0 and is cut to 8.
    assert {tuple(t.producer().inputs[1].const_value.numpy()) for t in targets[:3]} == {(2, 4)}
    assert tuple(targets[3].const_value.numpy()) == (0, 0, 8)


def test_groups_that_cannot_be_pruned_are_left_whole(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "Wa"], ["a"], name="into_concat"),
            helper.make_node("Concat", ["a", "x"], ["ax"], axis=1),
            helper.make_node("MatMul", ["ax", "Wc"], ["y1"]),
            helper.make_node("MatMul", ["x", "Wb"], ["b"], name="into_layernorm"),
            helper.make_node("LayerNormalization", ["b", "ln_scale"], ["bn"], axis=-1),
            helper.make_node("MatMul", ["bn", "Wd"], ["y2"]),
            helper.make_node("MatMul", ["x", "We"], ["y3"], name="into_output"),
        ],
        "whole",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in ("y1", "y2", "y3")],
        [
            _init("Wa", rng.standard_normal((8, 6))),
            _init("Wc", rng.standard_normal((14, 4))),
            _init("Wb", rng.standard_normal((8, 6))),
            _init("ln_scale", np.ones(6)),
            _init("Wd", rng.standard_normal((6, 4))),
            _init("We", rng.standard_normal((8, 4))),
        ],
    )
    model = _load(toy._model(graph), tmp_path)
    pass_ = PruneStructuredPass(EXACT)
    assert not pass_(model).modified
    left = pass_.details["left_whole"]
    assert "Concat" in left["Wa"] and "joins or splits along the channels" in left["Wa"]  # type: ignore[index]
    assert "normalizes over the channels" in left["Wb"]  # type: ignore[index]
    assert left["We"] == "the channels reach graph output 'y3'"  # type: ignore[index]
    assert HISTORY_KEY not in model.metadata_props


def test_residual_skip_and_exclusions(tmp_path: Path) -> None:
    model = _load(_residual_cnn(), tmp_path)
    pass_ = PruneStructuredPass(PruneStructuredConfig(round_to=1, residual="skip"))
    pass_(model)
    assert list(pass_.details["groups"]) == ["Wa"]  # type: ignore[arg-type]
    model = _load(_residual_cnn(), tmp_path)
    pass_ = PruneStructuredPass(PruneStructuredConfig(round_to=1, exclude=("conv_a",)))
    pass_(model)
    assert list(pass_.details["groups"]) == ["W0+Wb"]  # type: ignore[arg-type]
    assert "excluded by the config" in pass_.details["left_whole"]["Wa"]  # type: ignore[index]
    model = _load(_mlp(), tmp_path)
    assert not PruneStructuredPass(PruneStructuredConfig(kinds=("conv", "heads")))(model).modified


def test_round_to_keeps_vector_friendly_widths(tmp_path: Path) -> None:
    model = _load(_mlp(hidden=40), tmp_path)
    PruneStructuredPass(PruneStructuredConfig(ratio=0.3))(model)  # 28 kept -> 24 or 32: both multiples of 8
    assert model.graph.initializers["W1"].const_value.shape[1] % 8 == 0


def test_second_run_after_save_and_load_changes_nothing(tmp_path: Path) -> None:
    model = _load(_mlp(), tmp_path)
    assert PruneStructuredPass(EXACT)(model).modified
    saved = io.save_model(model, tmp_path / "pruned.onnx")
    again = io.load_model(saved.path)
    assert again.metadata_props[HISTORY_KEY] == '{"W1": 12}'
    assert not PruneStructuredPass(EXACT)(again).modified
    assert PruneStructuredPass(PruneStructuredConfig(ratio=0.75, round_to=1))(again).modified  # 6 -> 3


def test_recovery_refits_the_next_layer(tmp_path: Path) -> None:
    x = np.random.default_rng(5).standard_normal((64, 8)).astype(np.float32)
    dense = _run(_load(_mlp(hidden=32), tmp_path), x)
    errors = {}
    for recover in (False, True):
        model = _load(_mlp(hidden=32), tmp_path, f"m{recover}.onnx")
        step = f"prune_structured:round_to=1,importance=activation,recover={str(recover).lower()}"
        records = graphopt.Pipeline(recipe.parse_passes([step]), check=True).run(
            model, calibration=DataSpec(samples=256, batch_size=32)
        )
        errors[recover] = float(np.linalg.norm(_run(model, x) - dense) / np.linalg.norm(dense))
        assert records[0].details["groups"]["W1"]["refitted"] == (["o"] if recover else [])  # type: ignore[index]
    assert errors[True] < 0.7 * errors[False]


def test_calibration_is_required_when_asked_for(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pass 'prune_structured' needs calibration data"):
        graphopt.optimize(_load(_mlp(), tmp_path), ["prune_structured:recover=true"])
    with pytest.raises(PassError, match="importance=activation and recover need calibration statistics"):
        PruneStructuredPass(PruneStructuredConfig(importance="activation", recover=True))(_load(_mlp(), tmp_path))


def test_recovery_reads_a_one_shot_generator_again(tmp_path: Path) -> None:
    """Recovery reads the data once per stage: a generator's batches are kept and replayed (DataSpec)."""
    rng = np.random.default_rng(6)
    batches = ({"x": rng.standard_normal((4, 3, 6, 6)).astype(np.float32)} for _ in range(4))
    records = graphopt.Pipeline(recipe.parse_passes(["prune_structured:round_to=1,recover=true"])).run(
        _load(_residual_cnn(), tmp_path), calibration=DataSpec(source=batches, samples=16)
    )
    assert records[0].modified and records[0].details["channels_removed"] > 0


def test_digits_cnn_with_recovery_and_fold() -> None:
    model = io.load_model(DATA / "digits_cnn.onnx")
    reference = model.clone()
    steps = recipe.parse_passes(["prune_structured:ratio=0.5,importance=activation,recover=true", "fold"])
    records = graphopt.Pipeline(steps, check=True).run(
        model, calibration=DataSpec(source=str(DATA / "digits_calib.npz"), samples=128, batch_size=32)
    )
    assert records[0].details["channels_removed"] == 96 and records[0].details["groups_pruned"] == 4
    assert "BatchNormalization" not in [n.op_type for n in model.graph]
    with np.load(DATA / "digits_test.npz") as test:
        feeds, labels = {"input": test["input"]}, test["labels"]
    assert verify.label_accuracy(model, feeds, labels) >= verify.label_accuracy(reference, feeds, labels) - 0.03


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"ratio": 1.0}, "ratio must be in [0, 1); got 1.0"),
        ({"kinds": ["attention"]}, "kinds ['attention'] are unknown; choose from conv, mlp, heads"),
        ({"ridge": -1}, "ridge must be >= 0; got -1.0"),
        ({"round_to": 0}, "round_to must be >= 1; got 0"),
        ({"importance": "taylor"}, "'taylor' is not one of 'weight', 'activation'"),
        ({"residual": "merge"}, "'merge' is not one of 'together', 'skip'"),
        ({"recover": "yes"}, "recover: expected bool; got 'yes' (str)"),
        ({"sparsity": 0.5}, "unknown key(s) 'sparsity'"),
    ],
)
def test_bad_configs(options: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe.make_step("prune_structured", options, "recipe")
    assert message in str(info.value)
