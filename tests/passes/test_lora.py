from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import io, recipe, runtime, serialize
from graphopt.errors import DataError, RecipeError
from graphopt.numerics import affine as quant
from graphopt.numerics import blocks as quant_blocks
from graphopt.numerics import nf4 as quant_nf4
from graphopt.passes.lora.merge import MergeLoraConfig, MergeLoraPass, UnmergeLoraConfig, UnmergeLoraPass

F = TensorProto.FLOAT
D_IN, D_OUT, RANK, SCALE = 8, 6, 3, 0.5
RNG_SEED = 0


def _arrays(d_in: int = D_IN, d_out: int = D_OUT) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(RNG_SEED)
    return {
        "W": rng.standard_normal((d_in, d_out)).astype(np.float32),  # effective [in, out]
        "A": rng.standard_normal((d_in, RANK)).astype(np.float32),
        "B": rng.standard_normal((RANK, d_out)).astype(np.float32),
        "b": rng.standard_normal(d_out).astype(np.float32),
    }


def _model(nodes: list, inits: dict, outputs: list[str], *, opset: int = 18, shape: list | None = None) -> ir.Model:
    shape = shape or ["n", D_IN]
    graph = helper.make_graph(
        nodes,
        "lora",
        [helper.make_tensor_value_info("x", F, shape)],
        [helper.make_tensor_value_info(o, F, [None] * len(shape)) for o in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 10
    return ir.serde.deserialize_model(proto)


def _n(op: str, inputs: list[str], outputs: list[str], **kwargs: object) -> onnx.NodeProto:
    return helper.make_node(op, inputs, outputs, name=f"{op}_{outputs[0]}", **kwargs)


def _branch(x: str, *, scale: str, steps: str, order: str, d_in: int = D_IN) -> tuple[list, dict]:
    """LoRA nodes x -> A -> B -> scale, ending in value 'lora'; scale placements as exporters emit."""
    arrays = _arrays(d_in)
    inits: dict[str, np.ndarray] = {}
    if scale in ("mul", "between"):
        inits["s"] = np.array(SCALE, np.float32)
    if scale == "div":
        inits["two"] = np.array(1.0 / SCALE, np.float32)
    a, b = arrays["A"] * (SCALE if scale == "in_a" else 1.0), arrays["B"]
    if steps == "gemm":
        inits.update(A=a.T.copy(), B=b.T.copy())
        nodes = [_n("Gemm", [x, "A"], ["h"], transB=1), _n("Gemm", ["h2" if scale == "between" else "h", "B"], ["up"])]
        nodes[1] = _n("Gemm", [nodes[1].input[0], "B"], ["up"], transB=1)
    else:
        inits.update(A=a, B=b)
        nodes = [_n("MatMul", [x, "A"], ["h"]), _n("MatMul", ["h2" if scale == "between" else "h", "B"], ["up"])]
    tail = {
        "mul": [_n("Mul", ["up", "s"] if order == "base" else ["s", "up"], ["lora"])],
        "div": [_n("Div", ["up", "two"], ["lora"])],
        "between": [_n("Mul", ["h", "s"], ["h2"]), _n("Identity", ["up"], ["lora"])],
        "in_a": [_n("Identity", ["up"], ["lora"])],
    }[scale]
    return nodes + tail, inits


def lora_linear(
    *,
    base: str = "matmul",
    bias: str = "before",
    order: str = "base",
    scale: str = "mul",
    wrap: str | None = None,
    steps: str = "matmul",
    shared: bool = False,
    post_cast: bool = False,
) -> ir.Model:
    """y = base(x) (+ b) + s·(x·A)·B in the variants torch exporters produce."""
    arrays = _arrays()
    inits = {"b": arrays["b"]}
    nodes = []
    if base == "gemm":  # TorchScript's Linear on 2-D input: Gemm(x, W [out, in], b, transB=1), here with alpha
        inits["W"] = arrays["W"].T / 0.5
        nodes.append(_n("Gemm", ["x", "W", "b"] if bias == "before" else ["x", "W"], ["base"], transB=1, alpha=0.5))
    elif base == "transposed":
        inits["W"] = arrays["W"].T.copy()
        nodes += [_n("Transpose", ["W"], ["Wt"], perm=[1, 0]), _n("MatMul", ["x", "Wt"], ["base0"])]
    else:
        inits["W"] = arrays["W"]
        nodes.append(_n("MatMul", ["x", "W"], ["base0"]))
    if base != "gemm":
        nodes.append(_n("Add", ["base0", "b"], ["base"]) if bias == "before" else _n("Identity", ["base0"], ["base"]))
    x_lora = "x"
    if wrap:
        extra = {"cast": {"to": F}}.get(wrap, {})
        nodes.append(_n(wrap.capitalize(), ["x"], ["xw"], **extra))
        x_lora = "xw"
    branch, branch_inits = _branch(x_lora, scale=scale, steps=steps, order=order)
    nodes += branch
    inits.update(branch_inits)
    nodes.append(_n("Add", ["base", "lora"] if order == "base" else ["lora", "base"], ["sum"]))
    last = "sum"
    if bias == "after":
        nodes.append(_n("Add", ["sum", "b"], ["biased"]))
        last = "biased"
    if post_cast:
        nodes.append(_n("Cast", [last], ["cast"], to=F))
        last = "cast"
    nodes.append(_n("Relu", [last], ["y"]))
    outputs = ["y"]
    if shared:
        nodes.append(_n("MatMul", ["x", "W"], ["y2"]))
        outputs.append("y2")
    return _model(nodes, inits, outputs)


def _x(shape: tuple[int, ...] = (5, D_IN), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return runtime.run(runtime.create_session(model, optimization="disable"), feeds)


def _assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rel: float = 1e-5) -> None:
    for name, value in want.items():
        assert np.abs(got[name] - value).max() <= rel * max(np.abs(value).max(), 1e-6), name


def _merge(model: ir.Model, feeds: dict[str, np.ndarray], config: MergeLoraConfig | None = None) -> MergeLoraPass:
    """Merge in place; assert ORT equality, onnx.checker, idempotence and unchanged graph I/O."""
    before = _run(model, feeds)
    io_before = [(v.name, v.dtype, v.shape) for v in [*model.graph.inputs, *model.graph.outputs]]
    merge = MergeLoraPass(config)
    assert merge(model).modified
    serialize.check_model(model)
    _assert_close(_run(model, feeds), before)
    assert [(v.name, v.dtype, v.shape) for v in [*model.graph.inputs, *model.graph.outputs]] == io_before
    assert not MergeLoraPass(config)(model).modified
    return merge


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


@pytest.mark.parametrize(
    ("options", "ops"),
    [
        ({}, ["MatMul", "Add", "Relu"]),
        ({"order": "lora"}, ["MatMul", "Add", "Relu"]),
        ({"bias": "after"}, ["MatMul", "Identity", "Add", "Relu"]),
        ({"base": "gemm"}, ["Gemm", "Relu"]),
        ({"base": "gemm", "bias": "after"}, ["Gemm", "Add", "Relu"]),
        ({"base": "transposed"}, ["Transpose", "MatMul", "Add", "Relu"]),
        ({"steps": "gemm"}, ["MatMul", "Add", "Relu"]),
        ({"scale": "div"}, ["MatMul", "Add", "Relu"]),
        ({"scale": "between"}, ["MatMul", "Add", "Relu"]),
        ({"scale": "in_a"}, ["MatMul", "Add", "Relu"]),
        ({"wrap": "identity"}, ["MatMul", "Add", "Relu"]),
        ({"wrap": "cast"}, ["MatMul", "Add", "Relu"]),
        ({"wrap": "dropout"}, ["MatMul", "Add", "Relu"]),
        ({"post_cast": True}, ["MatMul", "Add", "Relu"]),
    ],
)
def test_branch_variants_merge_exactly(options: dict[str, object], ops: list[str]) -> None:
    model = lora_linear(**options)  # type: ignore[arg-type]
    merge = _merge(model, {"x": _x()})
    assert _ops(model) == ops
    assert merge.details["branches_merged"] == {"gemm" if options.get("base") == "gemm" else "matmul": 1}
    assert set(model.graph.initializers) == {"W", "b"}


def test_merged_weight_is_w_plus_scaled_ab() -> None:
    model = lora_linear()
    MergeLoraPass()(model)
    arrays = _arrays()
    expected = arrays["W"] + SCALE * arrays["A"] @ arrays["B"]
    np.testing.assert_allclose(model.graph.initializers["W"].const_value.numpy(), expected, rtol=1e-6)


def test_shared_base_weight_is_left_alone_or_copied() -> None:
    model = lora_linear(shared=True)
    merge = MergeLoraPass()
    assert not merge(model).modified
    assert "MatMul_h" in [n.name for n in model.graph]
    assert any("also read by other nodes" in reason for reason in merge.details["branches_left"])
    _merge(model, {"x": _x()}, MergeLoraConfig(shared_weights="copy"))
    assert sorted(model.graph.initializers) == ["W", "W.merged", "b"]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (("Mul_lora", 1, "x"), "not a product with a constant scalar"),
        (("MatMul_h", 0, "other"), "reads another input"),
    ],
)
def test_non_lora_adds_are_left_alone(change: tuple[str, int, str], why: str) -> None:
    proto = ir.serde.serialize_model(lora_linear())
    node_name, index, new_input = change
    next(n for n in proto.graph.node if n.name == node_name).input[index] = new_input
    proto.graph.input.append(helper.make_tensor_value_info("other", F, ["n", D_IN]))
    model = ir.serde.deserialize_model(proto)
    merge = MergeLoraPass()
    assert not merge(model).modified
    assert len(list(model.graph)) == len(proto.graph.node)
    assert why in " | ".join(merge.details["branches_left"])


def test_branch_read_elsewhere_is_left_alone() -> None:
    proto = ir.serde.serialize_model(lora_linear())
    proto.graph.output.append(helper.make_tensor_value_info("h", F, [None, None]))
    model = ir.serde.deserialize_model(proto)
    assert not MergeLoraPass()(model).modified


def test_conv_lora_merges_into_the_kernel() -> None:
    rng = np.random.default_rng(3)
    inits = {
        "W": rng.standard_normal((6, 4, 3, 3)).astype(np.float32),
        "bias": rng.standard_normal(6).astype(np.float32),
        "A": rng.standard_normal((2, 4, 3, 3)).astype(np.float32),
        "B": rng.standard_normal((6, 2, 1, 1)).astype(np.float32),
        "s": np.array(0.25, np.float32),
    }
    nodes = [
        _n("Conv", ["x", "W", "bias"], ["base"], pads=[1, 1, 1, 1], strides=[2, 2]),
        _n("Conv", ["x", "A"], ["h"], pads=[1, 1, 1, 1], strides=[2, 2]),
        _n("Conv", ["h", "B"], ["up"]),
        _n("Mul", ["up", "s"], ["lora"]),
        _n("Add", ["base", "lora"], ["y"]),
    ]
    model = _model(nodes, inits, ["y"], shape=["n", 4, 9, 9])
    merge = _merge(model, {"x": _x((2, 4, 9, 9))})
    assert _ops(model) == ["Conv"] and merge.details["branches_merged"] == {"conv": 1}


@pytest.mark.parametrize("splitter", ["Split", "Slice"])
def test_lora_on_a_fused_qkv_projection_touches_its_columns_only(splitter: str) -> None:
    rng = np.random.default_rng(4)
    inits = {
        "Wqkv": rng.standard_normal((D_IN, 3 * D_OUT)).astype(np.float32),
        "bqkv": rng.standard_normal(3 * D_OUT).astype(np.float32),
        "sizes": np.array([D_OUT] * 3, np.int64),
        "starts": np.array([2 * D_OUT], np.int64),
        "ends": np.array([3 * D_OUT], np.int64),
        "axes": np.array([-1], np.int64),
    }
    nodes = [_n("MatMul", ["x", "Wqkv"], ["qkv0"]), _n("Add", ["qkv0", "bqkv"], ["qkv"])]
    if splitter == "Split":
        nodes.append(_n("Split", ["qkv", "sizes"], ["q", "k", "v"], axis=-1))
    else:
        nodes.append(_n("Slice", ["qkv", "starts", "ends", "axes"], ["v"]))
    branch, branch_inits = _branch("x", scale="mul", steps="matmul", order="base")
    inits.update(branch_inits)
    nodes += [*branch, _n("Add", ["v", "lora"], ["v2"])]
    model = _model(nodes, inits, ["v2", "q"] if splitter == "Split" else ["v2"])
    before = model.graph.initializers["Wqkv"].const_value.numpy().copy()
    _merge(model, {"x": _x()})
    after = model.graph.initializers["Wqkv"].const_value.numpy()
    np.testing.assert_array_equal(after[:, : 2 * D_OUT], before[:, : 2 * D_OUT])


def test_lora_inside_an_if_branch_merges() -> None:
    inner_nodes, inits = _branch("x", scale="mul", steps="matmul", order="base")
    inits.update(W=_arrays()["W"])
    body = helper.make_graph(
        [_n("MatMul", ["x", "W"], ["base"]), *inner_nodes, _n("Add", ["base", "lora"], ["out"])],
        "then",
        [],
        [helper.make_tensor_value_info("out", F, [None, None])],
    )
    other = helper.make_graph(
        [_n("MatMul", ["x", "W2"], ["out2"])], "else", [], [helper.make_tensor_value_info("out2", F, [None, None])]
    )
    nodes = [_n("ReduceSum", ["x"], ["total"], keepdims=0), _n("Greater", ["total", "zero"], ["c"])]
    nodes.append(helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other, name="if"))
    model = _model(nodes, {**inits, "W2": _arrays()["W"] * 2, "zero": np.array(0.0, np.float32)}, ["y"])
    _merge(model, {"x": np.abs(_x())})
    assert [n.op_type for n in model.graph.node(2).attributes["then_branch"].as_graph()] == ["MatMul"]


def quantized_lora(kind: str) -> tuple[ir.Model, np.ndarray]:
    """A LoRA branch beside a quantized 32×6 base weight; returns the model and the dequantized weight."""
    k = 32
    w = np.random.default_rng(5).standard_normal((k, D_OUT)).astype(np.float32)
    opset, domain = 18, {"domain": "com.microsoft"}
    if kind == "dq_int8":  # per output channel, symmetric
        params = quant.weight_params(w, "int8", axis=1)
        inits = {"q": params.quantize(w), "scale": params.scale, "zp": params.zero_point}
        nodes = [_n("DequantizeLinear", ["q", "scale", "zp"], ["w"], axis=1), _n("MatMul", ["x", "w"], ["base"])]
        w = params.dequantize(inits["q"])
    elif kind == "dq_int4_blocked":
        blocks = quant_blocks.quantize_int_blocks(w, 4, 16, symmetric=True)
        inits = {"q": blocks.codes.astype(ir.DataType.INT4.numpy()), "scale": blocks.scales}
        nodes = [
            _n("DequantizeLinear", ["q", "scale"], ["w"], axis=0, block_size=16),
            _n("MatMul", ["x", "w"], ["base"]),
        ]
        w, opset = blocks.dequantize(), 21
    elif kind == "nbits":
        blocks = quant_blocks.quantize_int_blocks(w, 4, 16, symmetric=False)
        data, scales, zps = quant_blocks.matmul_nbits_layout(blocks)
        inits = {"Bq": data, "scales": scales.ravel(), "zp": zps.ravel()}
        attrs = {"K": k, "N": D_OUT, "bits": 4, "block_size": 16}
        nodes = [_n("MatMulNBits", ["x", "Bq", "scales", "zp"], ["base"], **attrs, **domain)]
        w = blocks.dequantize()
    else:
        blocks = quant_nf4.quantize_bnb4(w, "nf4", 16, double_quant=False)
        data, absmax = quant_nf4.matmul_bnb4_layout(blocks)
        attrs = {"K": k, "N": D_OUT, "block_size": 16, "quant_type": 1}
        inits = {"Bq": data, "absmax": absmax}
        nodes = [_n("MatMulBnb4", ["x", "Bq", "absmax"], ["base"], **attrs, **domain)]
        w = blocks.dequantize()
    branch, branch_inits = _branch("x", scale="mul", steps="matmul", order="base", d_in=k)
    nodes += [*branch, _n("Add", ["base", "lora"], ["y"])]
    return _model(nodes, {**inits, **branch_inits}, ["y"], opset=opset, shape=["n", k]), w


@pytest.mark.parametrize(
    ("kind", "tolerance"), [("dq_int8", 0.02), ("dq_int4_blocked", 0.2), ("nbits", 0.2), ("bnb4", 0.2)]
)
def test_quantized_base_is_requantized_in_its_own_format(kind: str, tolerance: float) -> None:
    model, w = quantized_lora(kind)
    x = _x((4, 32))
    arrays = _arrays(32)
    wanted = x @ (w + SCALE * arrays["A"] @ arrays["B"])
    np.testing.assert_allclose(_run(model, {"x": x})["y"], wanted, rtol=1e-4, atol=1e-4)
    formats = {n: (v.dtype, v.shape) for n, v in model.graph.initializers.items() if n not in ("A", "B", "s")}
    merge = MergeLoraPass()
    assert merge(model).modified and not MergeLoraPass()(model).modified
    serialize.check_model(model)
    assert {n: (v.dtype, v.shape) for n, v in model.graph.initializers.items()} == formats
    assert "Mul" not in _ops(model) and len(_ops(model)) == (2 if kind.startswith("dq") else 1)
    error = np.abs(_run(model, {"x": x})["y"] - wanted).max() / np.abs(wanted).max()
    assert error < tolerance
    assert 0 < merge.details["requantization_max_abs_err"] < tolerance * np.abs(w).max()


def test_keep_branch_leaves_quantized_bases_alone() -> None:
    model, _ = quantized_lora("nbits")
    merge = MergeLoraPass(MergeLoraConfig(quantized="keep_branch"))
    assert not merge(model).modified
    assert any("keep_branch" in reason for reason in merge.details["branches_left"])


MODULES = {"layers.0.q_proj": (8, 8), "layers.0.fc": (8, 8), "head": (8, 6)}  # PEFT name -> (in, out)


def adapter_base() -> ir.Model:
    """Three linears named the three ways exporters do: name scopes, TorchScript node name, weight name."""
    rng = np.random.default_rng(6)
    inits = {
        "val_3": rng.standard_normal((8, 8)).astype(np.float32),
        "onnx::MatMul_7": rng.standard_normal((8, 8)).astype(np.float32),
        "head.weight": rng.standard_normal((6, 8)).astype(np.float32),
        "head.bias": rng.standard_normal(6).astype(np.float32),
    }
    q = helper.make_node("MatMul", ["x", "val_3"], ["h1"], name="node_MatMul_3")
    q.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'layers.0', 'layers.0.q_proj', 'linear']")
    nodes = [
        q,
        helper.make_node("MatMul", ["h1", "onnx::MatMul_7"], ["h2"], name="/layers.0/fc/MatMul"),
        helper.make_node("Gemm", ["h2", "head.weight", "head.bias"], ["y"], name="/head/Gemm", transB=1),
    ]
    return _model(nodes, inits, ["y"])


def _effective(model: ir.Model) -> dict[str, np.ndarray]:
    weights = {n: v.const_value.numpy() for n, v in model.graph.initializers.items()}
    return {
        "layers.0.q_proj": weights["val_3"],
        "layers.0.fc": weights["onnx::MatMul_7"],
        "head": weights["head.weight"].T,
    }


def write_adapter(folder: Path, *, seed: int = 7, rank: int = 4, modules: dict | None = None, **config: object) -> dict:
    """A PEFT-style adapter folder; returns {module: (A [r, in], B [out, r])}."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    factors, tensors = {}, {}
    for name, (d_in, d_out) in (modules or MODULES).items():
        a = rng.standard_normal((rank, d_in)).astype(np.float32)
        b = rng.standard_normal((d_out, rank)).astype(np.float32)
        factors[name] = (a, b)
        tensors[f"base_model.model.{name}.lora_A.weight"] = a
        tensors[f"base_model.model.{name}.lora_B.weight"] = b
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": 8, "target_modules": ["q_proj", "fc", "head"], **config}
    (folder / "adapter_config.json").write_text(json.dumps(settings))
    return factors


def _merged(model: ir.Model, adapters: list[tuple[dict, float]]) -> dict[str, np.ndarray]:
    """The effective weights numpy expects after adding w·s·(B·A)ᵀ per adapter."""
    expected = {k: v.astype(np.float64) for k, v in _effective(model).items()}
    for factors, scale in adapters:
        for name, (a, b) in factors.items():
            expected[name] += scale * (b.astype(np.float64) @ a).T
    return expected


def test_adapter_folder_merges_and_unmerges(tmp_path: Path) -> None:
    factors = write_adapter(tmp_path / "ad")
    model = adapter_base()
    original = _effective(model)
    expected = _merged(model, [(factors, 8 / 4)])
    config = MergeLoraConfig(adapters=(str(tmp_path / "ad"),))
    merge = MergeLoraPass(config)
    assert merge(model).modified
    serialize.check_model(model)
    for name, weight in _effective(model).items():
        np.testing.assert_allclose(weight, expected[name], rtol=1e-5, atol=1e-5)
    assert merge.details["modules_matched"] == 3 and merge.details["modules_merged"] == {"matmul": 2, "gemm": 1}
    assert not MergeLoraPass(config)(model).modified  # the model remembers the adapter
    unmerge = UnmergeLoraPass(UnmergeLoraConfig(adapters=config.adapters))
    assert unmerge(model).modified and not UnmergeLoraPass(unmerge.config)(model).modified
    for name, weight in _effective(model).items():
        np.testing.assert_allclose(weight, original[name], rtol=1e-5, atol=1e-5)
    assert not MergeLoraPass(MergeLoraConfig(in_graph=False))(model).modified


@pytest.mark.parametrize("combination", ["linear", "cat"])
def test_weighted_adapters_combine_like_peft(tmp_path: Path, combination: str) -> None:
    first, second = write_adapter(tmp_path / "a", seed=1), write_adapter(tmp_path / "b", seed=2, use_rslora=True)
    model = adapter_base()
    weights, scales = (0.7, -0.4), (8 / 4, 8 / 2)
    expected = _merged(model, [(first, weights[0] * scales[0]), (second, weights[1] * scales[1])])
    if combination == "linear":  # PEFT: A and B are each weighted sums, with sqrt(|w·s|) and the sign on A
        expected = {k: v.astype(np.float64) for k, v in _effective(model).items()}
        for name in MODULES:
            root = [np.sqrt(abs(w * s)) for w, s in zip(weights, scales, strict=True)]
            a = np.sign(weights[0]) * root[0] * first[name][0] + np.sign(weights[1]) * root[1] * second[name][0]
            b = root[0] * first[name][1] + root[1] * second[name][1]
            expected[name] += (b.astype(np.float64) @ a).T
    adapters = (str(tmp_path / "a"), str(tmp_path / "b"))
    MergeLoraPass(MergeLoraConfig(adapters=adapters, weights=weights, combination=combination))(model)
    for name, weight in _effective(model).items():
        np.testing.assert_allclose(weight, expected[name], rtol=1e-5, atol=1e-5)


def test_module_names_match_by_suffix_and_mapping(tmp_path: Path) -> None:
    modules = {"q_proj": (8, 8), "custom.block": (8, 8)}
    write_adapter(tmp_path / "ad", modules=modules)
    model = adapter_base()
    with pytest.raises(DataError) as info:
        MergeLoraPass(MergeLoraConfig(adapters=(str(tmp_path / "ad"),)))(model)
    assert "1 adapter module(s) match no op of the model: custom.block" in str(info.value)
    assert "head, layers.0.fc, layers.0.q_proj" in str(info.value)
    (tmp_path / "map.json").write_text(json.dumps({"custom.block": "/layers.0/fc/MatMul"}))
    config = MergeLoraConfig(adapters=(str(tmp_path / "ad"),), mapping_file=str(tmp_path / "map.json"))
    merge = MergeLoraPass(config)
    assert merge(model).modified and merge.details["modules_matched"] == 2


def test_bfloat16_adapter_and_alpha_pattern(tmp_path: Path) -> None:
    folder = tmp_path / "ad"
    factors = write_adapter(folder, modules={"head": (8, 6)}, alpha_pattern={"head": 2})
    # Rewrite the tensors as bfloat16 (the top half of float32), which numpy cannot hold.
    header, blobs, offset = {}, [], 0
    for key, array in {
        "base_model.model.head.lora_A.weight": factors["head"][0],
        "base_model.model.head.lora_B.weight": factors["head"][1],
    }.items():
        raw = (array.view(np.uint32) >> 16).astype(np.uint16).tobytes()
        header[key] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    model = adapter_base()
    before = _effective(model)["head"]
    MergeLoraPass(MergeLoraConfig(adapters=(str(folder),)))(model)
    a, b = (f.view(np.uint32) >> 16 << 16 for f in factors["head"])
    expected = before + 2 / 4 * (b.view(np.float32) @ a.view(np.float32)).T
    np.testing.assert_allclose(_effective(model)["head"], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("merge_lora", {"weights": [1.0]}, "merge_lora: weights has 1 value(s) for 0 adapter(s); give one weight"),
        ("merge_lora", {"adapters": "a"}, "adapters: expected a list; got 'a'. Write lists in brackets"),
        ("merge_lora", {"weights": ["x"]}, "weights[0]: expected float; got 'x' (str)."),
        ("merge_lora", {"quantized": "drop"}, "quantized: 'drop' is not one of 'requantize', 'keep_branch'."),
        ("merge_lora", {"shared_weights": True}, "shared_weights: True is not one of 'skip', 'copy'."),
        ("merge_lora", {"combination": "ties"}, "combination: 'ties' is not one of 'linear', 'cat'."),
        ("merge_lora", {"mapping": {"a": 1}}, "mapping.a: expected str; got 1 (int)."),
        ("merge_lora", {"bogus": 1}, "unknown key(s) 'bogus'; valid keys: adapters, weights, combination, mapping"),
        ("unmerge_lora", {}, "unmerge_lora: adapters is empty; give the adapter folder(s) that were merged."),
    ],
)
def test_bad_configs(name: str, options: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe.make_step(name, options, "recipe")
    assert message in str(info.value)


def _break(folder: Path, what: str) -> None:
    if what == "no folder":
        return
    write_adapter(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    if what == "no weights":
        (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    elif what in ("lora_alpha", "use_dora", "peft_type"):
        config[what] = {"lora_alpha": "16", "use_dora": True, "peft_type": "IA3"}[what]
    elif what == "embedding":
        from safetensors.numpy import save_file

        save_file({"base_model.model.embed.lora_embedding_A": np.ones((2, 2), np.float32)}, str(folder / "x"))
        (folder / "x").replace(folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("no folder", "does not exist. Give the folder PEFT's save_pretrained wrote"),
        ("no weights", "has no adapter_model.safetensors. Re-save it with safe_serialization=True."),
        ("lora_alpha", "lora_alpha must be int or float; got '16'. Fix the adapter config."),
        ("use_dora", "use_dora is true; DoRA adapters are not supported, only plain LoRA."),
        ("peft_type", "peft_type is 'IA3'; only LoRA adapters can be merged."),
        ("embedding", "tensors that are not LoRA A/B pairs: base_model.model.embed.lora_embedding_A"),
    ],
)
def test_bad_adapters(tmp_path: Path, what: str, message: str) -> None:
    _break(tmp_path / "ad", what)
    model = adapter_base()
    with pytest.raises(DataError) as info:
        MergeLoraPass(MergeLoraConfig(adapters=(str(tmp_path / "ad"),)))(model)
    assert message in str(info.value)
    assert _effective(model)["head"].tolist() == _effective(adapter_base())["head"].tolist()


def test_adapter_beside_a_quantized_base_as_a_float_branch(tmp_path: Path) -> None:
    model, w = quantized_lora("nbits")
    proto = ir.serde.serialize_model(model)
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    nodes[0].output[0] = "y"
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    model = ir.serde.deserialize_model(proto)
    factors = write_adapter(tmp_path / "ad", modules={"base": (32, D_OUT)})
    config = MergeLoraConfig(adapters=(str(tmp_path / "ad"),), mapping={"base": "MatMulNBits_base"})
    merge = MergeLoraPass(dataclasses.replace(config, quantized="keep_branch"))
    assert merge(model).modified
    serialize.check_model(model)
    a, b = factors["base"]
    x = _x((4, 32))
    np.testing.assert_allclose(_run(model, {"x": x})["y"], x @ (w + 2.0 * (b @ a).T), rtol=1e-4, atol=1e-4)
    assert merge.details["modules_merged"] == {"matmulnbits_float_branch": 1}
    requantized = ir.serde.deserialize_model(proto)
    merge = MergeLoraPass(config)
    assert merge(requantized).modified and merge.details["modules_merged"] == {"matmulnbits": 1}
    assert merge.details["requantization_max_abs_err"] > 0 and len(list(requantized.graph)) == 1


def test_zoo_transformer_lora_merges_to_the_base_graph() -> None:
    from models import zoo

    model = io.load_model(zoo.export("transformer_lora"))
    feeds = zoo.eval_data("transformer_lora", n=4).inputs
    merge = _merge(model, feeds)
    assert merge.details["branches_merged"] == {"matmul": 12}
    assert len(list(model.graph)) == len(list(io.load_model(zoo.export("transformer")).graph))


def test_pipeline_reports_what_merge_lora_did(tmp_path: Path) -> None:
    import graphopt

    write_adapter(tmp_path / "ad")
    path = tmp_path / "m.onnx"
    graphopt.save(adapter_base(), path)
    steps = [
        {"merge_lora": {"adapters": [str(tmp_path / "ad")]}},
        "unmerge_lora:adapters=[" + str(tmp_path / "ad") + "]",
    ]
    result = graphopt.optimize(path, {"passes": steps, "verify": {"enabled": False}})
    merged, unmerged = result.report.passes
    assert merged.modified and merged.details["modules_merged"] == {"matmul": 2, "gemm": 1}
    assert unmerged.modified and unmerged.details["weights_changed"] == 3


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_peft_adapter_and_weighted_combination_match_peft(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6)).eval()
    torch.onnx.export(base, (torch.randn(2, 8),), str(tmp_path / "base.onnx"), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "n"}})  # fmt: skip
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]), adapter_name="first")
    peft_model.add_adapter("second", LoraConfig(r=4, lora_alpha=4, target_modules=["0", "2"], use_rslora=True))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.1)
    for adapter in ("first", "second"):
        peft_model.save_pretrained(str(tmp_path), selected_adapters=[adapter])
    peft_model.add_weighted_adapter(["first", "second"], [0.7, -0.4], "both", combination_type="linear")
    x = _x((5, 8))
    model = io.load_model(tmp_path / "base.onnx")
    config = MergeLoraConfig(adapters=(str(tmp_path / "first"), str(tmp_path / "second")), weights=(0.7, -0.4))
    MergeLoraPass(config)(model)
    peft_model.set_adapter("both")
    with torch.no_grad():
        want = peft_model(torch.from_numpy(x)).numpy()
    _assert_close(_run(model, {"x": x}), {"y": want})
