"""Static QDQ quantization: calibrated Q/DQ pairs placed where ONNX Runtime fuses them."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphopt import runtime
from graphopt.numerics import affine
from graphopt.passes import edit
from graphopt.passes.edit import infer_types
from graphopt.passes.quantize import layout as quantize_layout
from graphopt.passes.quantize import outliers as quantize_outliers
from graphopt.passes.quantize import qdq
from graphopt.passes.quantize.dynamic import quantize_matmul

logger = logging.getLogger(__name__)

Range = tuple[float, float]

# op -> (weight input index, bias input index): weights quantized per channel to int8.
COMPUTE_OPS: dict[str, tuple[int, int | None]] = {"Conv": (1, 2), "MatMul": (1, None), "Gemm": (1, 2)}
# Ops whose output is a rearrangement of their input: same scale in and out, so ORT can
# run them on the integers directly (and drop the DQ -> op -> Q around them).
SAME_SCALE_OPS = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Slice", "Gather", "Resize"}
)
OMIT_ZERO_POINT_OPS = frozenset({"Conv", "MatMul"})
RELU_LIKE = frozenset({"Relu", "Clip"})
DEFAULT_OPS = (
    "Conv", "MatMul", "Gemm", "Add", "Mul", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
    "Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Gather", "Resize", "Sigmoid", "LeakyRelu",
)  # fmt: skip
ALREADY_QUANTIZED = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
    }
)
_ACT_INPUTS = {
    "Gather": (0,),
    "Reshape": (0,),
    "Slice": (0,),
    "Resize": (0,),
    "Clip": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
}


@dataclass(frozen=True)
class QuantizeConfig:
    """Options of the ``quantize`` pass."""

    mode: Literal["auto", "static", "dynamic"] = field(
        default="auto",
        metadata={
            "help": "static: calibrated Q/DQ; dynamic: int8 MatMul weights, activation scales at run time; "
            "auto: static when calibration data is given, else dynamic."
        },
    )
    activation_type: Literal["uint8", "int8", "uint16", "int16"] = field(
        default="uint8",
        metadata={"help": "Activation integer type; uint8 fuses best on ORT CPU (QLinearAdd needs it)."},
    )
    weight_type: Literal["int8", "uint8"] = field(default="int8", metadata={"help": "Weight integer type."})
    activation_symmetric: bool = field(
        default=False, metadata={"help": "Symmetric activations (zero point 0); asymmetric lets ReLU fold into the Q."}
    )
    weight_symmetric: bool = field(default=True, metadata={"help": "Symmetric weights: exact zeros stay zero."})
    per_channel: bool = field(default=True, metadata={"help": "One weight scale per output channel."})
    reduce_range: bool | Literal["auto"] = field(
        default="auto",
        metadata={
            "help": "7-bit weights, avoiding int16 saturation in ORT's u8s8 kernels on x86 without VNNI; "
            "auto: when this CPU lacks VNNI."
        },
    )
    method: Literal["minmax", "percentile", "entropy", "mse"] = field(
        default="percentile", metadata={"help": "How calibration picks each activation's clipping range."}
    )
    percentile: float = field(default=99.999, metadata={"help": "Percentile of |x| kept, for method=percentile."})
    op_types: tuple[str, ...] = field(default=DEFAULT_OPS, metadata={"help": "Op types to quantize."})
    exclude_op_types: tuple[str, ...] = field(default=(), metadata={"help": "Op types to leave in float."})
    exclude_nodes: tuple[str, ...] = field(default=(), metadata={"help": "Node names to leave in float."})
    exclude_tensors: tuple[str, ...] = field(
        default=(), metadata={"help": "Activation tensors to leave unquantized (what the accuracy fallback sets)."}
    )
    embeddings: bool = field(
        default=True,
        metadata={"help": "Store constant tables read by Gather (per-row scales) or Slice (one scale) as int8."},
    )
    islands: bool = field(
        default=True,
        metadata={
            "help": "Quantize non-compute ops only between quantized ops, and compute outputs only when a "
            "quantized op reads them (False: every listed op and every output, as ORT does)."
        },
    )
    max_abs_range: float = field(
        default=65504.0,
        metadata={
            "help": "Leave in float any activation whose calibrated range passes this (attention-mask sentinels)."
        },
    )
    tensor_types: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Per-tensor activation type overrides, e.g. {attn_scores: uint16}."}
    )
    outliers: float = field(
        default=3.0,
        metadata={
            "help": "MatMul input channels whose calibrated max |x| passes this many times that of the largest "
            "channel outside the top 1/64 are multiplied in float beside the int8 product, so they no longer "
            "set the int8 scale (LLM.int8-style); only for MatMuls whose output stays float (never with "
            "islands=false); 0 disables."
        },
    )


def selected_nodes(graph: ir.Graph, config: QuantizeConfig) -> list[ir.Node]:
    """Main-graph nodes to quantize: compute ops, and the other ops inside integer islands.

    A Conv/MatMul/Gemm is always quantized (that is where the speed is). Any other op is
    quantized only when all its float inputs come from quantized ops and all its readers
    are quantized ops: then its Q/DQ pairs save a conversion (QLinearAdd between
    QLinearConvs). Outside such islands a Q/DQ pair only adds rounding error: on MiniLM,
    quantizing every Add cost 0.02 of embedding cosine for no speed.
    """
    candidates = [n for n in graph if _wanted(n, config)]
    chosen = {id(n) for n in candidates}
    changed = config.islands
    while changed:
        changed = False
        for node in candidates:
            if id(node) in chosen and node.op_type not in COMPUTE_OPS and not _inside_island(node, chosen):
                chosen.discard(id(node))
                changed = True
    return [n for n in candidates if id(n) in chosen]


def _wanted(node: ir.Node, config: QuantizeConfig) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in config.op_types or excluded(node, config):
        return False
    return any(_is_float_activation(v) for v in _activation_inputs(node))


def _inside_island(node: ir.Node, chosen: set[int]) -> bool:
    for value in _activation_inputs(node):
        producer = value.producer() if value is not None else None
        if _is_float_activation(value) and producer is not None and id(producer) not in chosen:
            return False
    for out in node.outputs:
        if out.is_graph_output() or any(id(use.node) not in chosen for use in out.uses()):
            return False
    return True


def excluded(node: ir.Node, config: QuantizeConfig) -> bool:
    """Whether the user asked to keep ``node`` in float (unnamed nodes match no name)."""
    return bool(node.name and node.name in config.exclude_nodes) or node.op_type in config.exclude_op_types


def _is_float_activation(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.const_value is None
        and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    )


def _activation_inputs(node: ir.Node) -> list[ir.Value | None]:
    indices = _ACT_INPUTS.get(node.op_type)
    if node.op_type in COMPUTE_OPS:
        weight = COMPUTE_OPS[node.op_type][0]
        return [v for i, v in enumerate(node.inputs) if i < 2 and (i != weight or v is None or v.const_value is None)]
    if indices is None:
        return list(node.inputs)
    return [node.inputs[i] for i in indices if i < len(node.inputs)]


def calibration_targets(model: ir.Model, config: QuantizeConfig) -> list[str]:
    """Activation tensors whose ranges the pass needs."""
    if config.mode == "dynamic":
        return []
    infer_types(model)
    names: dict[str, None] = {}
    for node in selected_nodes(model.graph, config):
        for value in [*_activation_inputs(node), *node.outputs]:
            if _is_float_activation(value) and value.name:
                names[value.name] = None
    return list(names)


class CalibratedRanges(dict[str, Range]):
    """What calibration gives the pass: ``{tensor: (min, max)}``, plus per-channel bounds of MatMul inputs."""

    def __init__(
        self,
        ranges: Mapping[str, Range] | None = None,
        channels: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        super().__init__(ranges or {})
        self.channels = dict(channels or {})


class QuantizeQDQPass(ir.passes.InPlacePass):
    """Insert calibrated QuantizeLinear/DequantizeLinear pairs so ONNX Runtime runs the model in int8.

    Weights of Conv/MatMul/Gemm become int8 initializers (per channel by default) read
    through DequantizeLinear; biases become int32 with scale s_input*s_weight; every
    activation entering or leaving a selected op gets one Q -> DQ pair with the calibrated
    range, shared by all its readers. With asymmetric activations a ReLU (or Clip from 0)
    after a quantized tensor is removed: its Q saturates at zero, which is the same thing.
    Graph inputs/outputs keep their names and float types. A model that already holds Q/DQ
    or integer ops (a QAT export) is left unchanged. Only the main graph is quantized;
    subgraphs and functions are left alone.

    Attributes:
        config: The pass options.
        ranges: Calibrated (min, max) per activation tensor name; None (mode auto without
            calibration data) selects dynamic quantization.
    """

    def __init__(self, config: QuantizeConfig, ranges: Mapping[str, Range] | None) -> None:
        super().__init__()
        self.config = config
        self.dynamic = config.mode == "dynamic" or (config.mode == "auto" and ranges is None)
        self.ranges = dict(ranges or {})
        self.channels = dict(getattr(ranges, "channels", {}))
        self.details: dict[str, object] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if any(n.op_type in ALREADY_QUANTIZED and n.domain in ("", "ai.onnx") for n in graph):
            logger.info("quantize: the model already holds Q/DQ or integer ops; left unchanged")
            self.details = {"skipped": "already quantized"}
            return ir.passes.PassResult(model, modified=False)
        infer_types(model)
        if not self._has_work(model):
            self.details = {"skipped": "nothing to quantize"}
            return ir.passes.PassResult(model, modified=False)
        _check_opset(model, self.config)
        if self.dynamic:
            return self._dynamic(model)
        pools = 0
        if "GlobalAveragePool" in self.config.op_types:
            # Only where the pool will read a quantized tensor: in float, ReduceMean is the faster kernel.
            chosen = {id(n) for n in selected_nodes(graph, self.config)}
            pools = quantize_layout.spatial_means_to_pools(
                graph,
                lambda n: id(n) in chosen and n.inputs[0].name not in self.config.exclude_tensors,
                self.ranges,
            )
            if pools:
                infer_types(model)
        editor = _Editor(graph, self.config, self.ranges, self.channels)
        editor.counts["mean_to_pool"] = pools
        editor.run(selected_nodes(graph, self.config))
        self.details = editor.summary()
        return ir.passes.PassResult(model, modified=editor.changed or bool(pools))

    def _has_work(self, model: ir.Model) -> bool:
        tables = self.config.embeddings and any(
            n.op_type in ("Gather", "Slice")
            and n.inputs
            and n.inputs[0] is not None
            and n.inputs[0].const_value is not None
            for n in model.graph
        )
        if self.dynamic:
            return tables or any(
                n.op_type == "MatMul"
                and len(n.inputs) > 1
                and n.inputs[1] is not None
                and n.inputs[1].const_value is not None
                for n in model.graph
            )
        return tables or bool(selected_nodes(model.graph, self.config))

    def _dynamic(self, model: ir.Model) -> ir.passes.PassResult:
        taken: set[str] = set()
        count = 0
        for node in [n for n in selected_nodes(model.graph, self.config) if n.op_type == "MatMul"]:
            count += quantize_matmul(
                model.graph,
                node,
                per_channel=self.config.per_channel,
                reduce_range=resolve_reduce_range(self.config),
                taken=taken,
            )
        embeddings = 0
        if self.config.embeddings:
            for node in [n for n in model.graph if n.op_type in ("Gather", "Slice") and not excluded(n, self.config)]:
                quantize_table = qdq.quantize_gather_table if node.op_type == "Gather" else qdq.quantize_slice_table
                embeddings += quantize_table(model.graph, node, taken)
        self.details = {
            "mode": "dynamic",
            "dynamic_matmuls": count,
            "embeddings": embeddings,
            "reduce_range": resolve_reduce_range(self.config),
        }
        return ir.passes.PassResult(model, modified=bool(count or embeddings))


def resolve_reduce_range(config: QuantizeConfig) -> bool:
    """``reduce_range`` with "auto" decided for this CPU (only int8 weights can saturate)."""
    if config.reduce_range == "auto":
        return config.weight_type == "int8" and runtime.u8s8_saturates()
    return bool(config.reduce_range)


def _check_opset(model: ir.Model, config: QuantizeConfig) -> None:
    from graphopt.errors import PassError

    opset = model.opset_imports.get("", 0)
    needed = 21 if any(t.endswith("16") for t in (config.activation_type, *config.tensor_types.values())) else 13
    if opset < needed:
        raise PassError(
            f"quantize: the model's opset is {opset}, per-channel Q/DQ (and 16-bit types) need opset >= {needed}. "
            f"Re-export the model with opset_version={max(needed, 17)}."
        )


class _Editor:
    """One quantization of one graph: decides params, then edits."""

    def __init__(
        self,
        graph: ir.Graph,
        config: QuantizeConfig,
        ranges: dict[str, Range],
        channels: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        self.graph, self.config, self.ranges, self.channels = graph, config, ranges, channels or {}
        self.taken: set[str] = set()
        self.reduce_range = resolve_reduce_range(config)
        self.params: dict[str, affine.QuantParams] = {}
        self.weights: dict[str, ir.Value] = {}
        self.values: dict[str, ir.Value] = {}
        self.skipped: set[str] = set(config.exclude_tensors)
        self.counts = {
            "activations": 0,
            "weights": 0,
            "biases": 0,
            "relu_removed": 0,
            "embeddings": 0,
            "wide_range_skipped": 0,
            "outlier_channels": 0,
            "nodes": 0,
        }
        self.changed = False

    def summary(self) -> dict[str, object]:
        return {"mode": "static", **self.counts, "reduce_range": self.reduce_range}

    def run(self, nodes: list[ir.Node]) -> None:
        self.values = {v.name: v for v in self.graph.inputs if v.name}
        self.values.update({out.name: out for node in self.graph for out in node.outputs if out.name})
        selected = {id(n) for n in nodes}
        splits = self._plan_outliers(nodes, selected)
        for node in nodes:
            # An output no quantized op reads stays float: ORT then runs the producer as
            # MatMulIntegerToFloat (bias Add fused) instead of QLinearMatMul -> DQ -> Add.
            read = [v for v in node.outputs if self._output_quantized(v, selected)]
            for value in [*_activation_inputs(node), *read]:
                if _is_float_activation(value) and value.name not in self.params:
                    self._activation(value, node)
        # Weights first use activation params (bias scale = s_input * s_weight).
        for node in nodes:
            self._weights(node)
        for name, params in list(self.params.items()):
            self._insert(name, params)
        quantize_outliers.add_float_branches(self.graph, splits, self.taken)
        self._embeddings()
        self.counts["nodes"] = len(nodes)
        self.changed = bool(self.counts["activations"] or self.counts["weights"] or self.counts["embeddings"])

    def _output_quantized(self, value: ir.Value, selected: set[int]) -> bool:
        """Islands: only when a quantized op reads it. Without: always, as ORT does."""
        return not self.config.islands or any(id(use.node) in selected for use in value.uses())

    def _plan_outliers(self, nodes: list[ir.Node], selected: set[int]) -> list[quantize_outliers.Split]:
        if self.config.outliers <= 0 or not self.channels:
            return []

        def splittable(node: ir.Node) -> bool:
            x, producer = node.inputs[0], node.inputs[0].producer()
            return (
                x.name not in self.skipped
                and not excluded(node, self.config)
                # the output stays float (MatMulIntegerToFloat): the float product adds to it
                and not self._output_quantized(node.outputs[0], selected)
                # a removed ReLU's input, or a rearranged tensor sharing its source's scale
                and not (producer is not None and producer.op_type in RELU_LIKE | SAME_SCALE_OPS)
            )

        def initializer(name: str, array: np.ndarray) -> ir.Value:
            return edit.add_initializer(self.graph, edit.unique_name(self.graph, name, self.taken), array)

        splits = quantize_outliers.plan(
            nodes, self.channels, self.ranges, self.config.outliers, splittable, initializer
        )
        self.counts["outlier_channels"] = sum(len(s.channels) for s in splits)
        return splits

    def _embeddings(self) -> None:
        if not self.config.embeddings:
            return
        for node in list(self.graph):
            if node.domain not in ("", "ai.onnx") or excluded(node, self.config):
                continue
            quantize_table = {"Gather": qdq.quantize_gather_table, "Slice": qdq.quantize_slice_table}.get(node.op_type)
            if quantize_table is not None and quantize_table(self.graph, node, self.taken):
                self.counts["embeddings"] += 1

    def _activation(self, value: ir.Value, node: ir.Node) -> None:
        producer = value.producer()
        # An excluded tensor stays float through the Reshape/Transpose chain that carries
        # it: quantizing it one op later would put back the same rounding.
        carried = producer is not None and producer.op_type in SAME_SCALE_OPS and producer.inputs[0] is not None
        if value.name in self.skipped or (carried and producer.inputs[0].name in self.skipped):
            self.skipped.add(value.name)
            return
        if producer is not None and producer.op_type in SAME_SCALE_OPS and producer.op_type in self.config.op_types:
            source = producer.inputs[0]
            if source is not None and source.name in self.params:
                self.params[value.name] = self.params[source.name]
                return
        rng = self.ranges.get(value.name)
        if rng is None:
            logger.debug("quantize: no calibrated range for %s; left in float", value.name)
            return
        if max(abs(rng[0]), abs(rng[1])) > self.config.max_abs_range:
            logger.info("quantize: %s spans %.3g..%.3g (a mask or sentinel); left in float", value.name, *rng)
            self.counts["wide_range_skipped"] += 1
            return
        qtype = self.config.tensor_types.get(value.name, self.config.activation_type)
        symmetric = self.config.activation_symmetric
        self.params[value.name] = affine.compute_params(rng[0], rng[1], qtype, symmetric=symmetric)

    def _weights(self, node: ir.Node) -> None:
        if node.op_type not in COMPUTE_OPS:
            self._constant_inputs(node)
            return
        w_index, b_index = COMPUTE_OPS[node.op_type]
        weight = node.inputs[w_index] if len(node.inputs) > w_index else None
        if weight is None or weight.const_value is None or not weight.dtype.is_floating_point():
            return
        array = weight.const_value.numpy()
        trans_b = node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1
        axis = (
            affine.weight_channel_axis(node.op_type, rank=array.ndim, trans_b=trans_b)
            if self.config.per_channel
            else None
        )
        params = affine.weight_params(
            array,
            self.config.weight_type,
            axis=axis,
            symmetric=self.config.weight_symmetric,
            reduce_range=self.reduce_range,
        )
        # ORT fuses Conv/MatMul weights and every int32 bias without a zero point (DQ's
        # default of 0), but its QGemm fusion requires one on the weight.
        omit_zero = node.op_type in OMIT_ZERO_POINT_OPS
        dq_out = self._weight_dq(weight, array, params, omit_zero=omit_zero)
        node.replace_input_with(w_index, dq_out)
        edit.drop_if_unused(self.graph, weight)
        self._bias(node, b_index, params)

    def _weight_dq(
        self, weight: ir.Value, array: np.ndarray, params: affine.QuantParams, *, omit_zero: bool = False
    ) -> ir.Value:
        key = f"{weight.name}|{params.axis}|{omit_zero}"
        if key not in self.weights:
            quantized = params.quantize(array)
            dq = qdq.insert_weight_dq(self.graph, weight, quantized, params, self.taken, omit_zero=omit_zero)
            self.weights[key] = dq
            self.counts["weights"] += 1
        return self.weights[key]

    def _bias(self, node: ir.Node, b_index: int | None, w_params: affine.QuantParams) -> None:
        if b_index is None or len(node.inputs) <= b_index:
            return
        bias, x = node.inputs[b_index], node.inputs[0]
        if bias is None or bias.const_value is None or x is None or x.name not in self.params:
            return
        array = bias.const_value.numpy()
        if array.ndim != 1:
            return
        x_scale = self.params[x.name].scale
        b_params = affine.bias_params(x_scale, w_params.scale, 0 if w_params.axis is not None else None)
        quantized = affine.quantize_bias(array, b_params)
        dq = qdq.insert_weight_dq(self.graph, bias, quantized, b_params, self.taken, omit_zero=True)
        node.replace_input_with(b_index, dq)
        edit.drop_if_unused(self.graph, bias)
        self.counts["biases"] += 1

    def _constant_inputs(self, node: ir.Node) -> None:
        """Constant operands of Add/Mul/Concat are quantized like activations (same integer type)."""
        if node.op_type not in ("Add", "Mul", "Concat"):
            return
        for index, value in enumerate(node.inputs):
            if value is None or value.const_value is None or not value.dtype.is_floating_point():
                continue
            array = value.const_value.numpy()
            qtype = self.config.activation_type
            params = affine.weight_params(array, qtype, axis=None, symmetric=self.config.activation_symmetric)
            node.replace_input_with(index, self._weight_dq(value, array, params))
            edit.drop_if_unused(self.graph, value)

    def _insert(self, name: str, params: affine.QuantParams) -> None:
        value = self._value(name)
        if value is None or not value.uses():
            return
        relu = self._removable_relu(value, params)
        if relu is not None:
            # The Q of the ReLU's output reads the ReLU's input; the ReLU goes away.
            out = relu.outputs[0]
            qdq.insert_qdq(self.graph, out, self.params.get(out.name, params), self.taken, source=value)
            self.graph.remove(relu, safe=True)
            self.counts["relu_removed"] += 1
            self.counts["activations"] += 1
            return
        qdq.insert_qdq(self.graph, value, params, self.taken)
        self.counts["activations"] += 1

    def _value(self, name: str) -> ir.Value | None:
        value = self.values.get(name)
        # A removed ReLU's output no longer belongs to the graph.
        return (
            value if value is not None and (value.producer() is None or value.producer().graph is self.graph) else None
        )

    def _removable_relu(self, value: ir.Value, params: affine.QuantParams) -> ir.Node | None:
        """A ReLU/Clip(0, c) reading only ``value`` that asymmetric Q saturation reproduces."""
        if self.config.activation_symmetric or value.is_graph_output() or len(value.uses()) != 1:
            return None
        node = next(iter(value.uses())).node
        out = node.outputs[0]
        if node.op_type not in RELU_LIKE or node.op_type not in self.config.op_types or out.is_graph_output():
            return None
        if excluded(node, self.config):
            return None
        out_params = self.params.get(out.name)
        if out_params is None or not _saturates_at_zero(out_params):
            return None
        if node.op_type == "Clip" and not _clip_covered(node, self.ranges.get(out.name)):
            return None
        return node


def _saturates_at_zero(params: affine.QuantParams) -> bool:
    qmin = affine.qrange(params.qtype, symmetric=False)[0]
    return bool(np.all(params.zero_point.astype(np.int64) == qmin))


def _clip_covered(node: ir.Node, rng: Range | None) -> bool:
    """Clip(lo, hi) is redundant after Q when lo == 0 and the calibrated max is <= hi."""
    bounds = [v.const_value.numpy() if v is not None and v.const_value is not None else None for v in node.inputs[1:3]]
    lo = bounds[0] if bounds else None
    hi = bounds[1] if len(bounds) > 1 else None
    if lo is None or float(lo) != 0.0 or rng is None:
        return False
    return hi is None or rng[1] <= float(hi)


FALLBACK_METHODS = ("percentile", "mse")  # what the accuracy fallback tries before float layers


def range_alternatives(config: QuantizeConfig) -> list[QuantizeConfig]:
    """The same quantization with other ranges (same speed and size), for the accuracy fallback.

    7-bit weights first where 8-bit ones saturate ORT's kernels on this CPU, then the other
    clipping methods.
    """
    if config.mode == "dynamic":
        return []
    alternatives = []
    if config.reduce_range is False and config.weight_type == "int8" and runtime.u8s8_saturates():
        alternatives.append(dataclasses.replace(config, reduce_range="auto"))
    return alternatives + [dataclasses.replace(config, method=m) for m in FALLBACK_METHODS if m != config.method]


def collect_ranges(model: ir.Model, data: object, config: QuantizeConfig) -> CalibratedRanges | dict[str, Range] | None:
    """Calibrate the activation ranges the pass needs (the registry runs this before the pass).

    Returns None when ``mode`` is auto and there is no data: the pass then quantizes dynamically.
    """
    from graphopt.calibration.observers import ObserverConfig, observe_ranges
    from graphopt.calibration.sources import require_data

    if config.mode == "auto" and data is None:
        return None
    names = calibration_targets(model, config)
    if not names:
        return {}
    data = require_data(data, "quantize")

    def observer(qtype: str) -> ObserverConfig:
        return ObserverConfig(
            method=config.method,
            percentile=config.percentile,
            symmetric=config.activation_symmetric,
            num_bits=16 if qtype.endswith("16") else 8,
            unsigned=qtype.startswith("u"),
        )

    per_tensor = {name: observer(config.tensor_types.get(name, config.activation_type)) for name in names}
    # Large models are observed in groups of tensors so their activations never coexist.
    group = (
        64 if sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value) > 2**30 else None
    )
    wanted = set(names)
    bounds = quantize_outliers.ChannelBounds(
        n.inputs[0].name
        for n in selected_nodes(model.graph, config)
        if config.outliers > 0 and quantize_outliers.eligible_matmul(n) and n.inputs[0].name in wanted
    )
    ranges = observe_ranges(model, data, names, per_tensor, group_size=group, also=bounds)  # type: ignore[arg-type]
    return CalibratedRanges(ranges, bounds.bounds)
