"""The Q/DQ placement of the ``quantize`` pass, node by node, once ranges are known."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphopt.numerics import affine
from graphopt.passes import edit
from graphopt.passes.quantize import outliers as quantize_outliers
from graphopt.passes.quantize import qdq
from graphopt.passes.quantize import rounding as quantize_rounding
from graphopt.passes.quantize import smooth as quantize_smooth
from graphopt.passes.quantize.config import QuantizeConfig, resolve_reduce_range
from graphopt.passes.quantize.select import (
    COMPUTE_OPS,
    OMIT_ZERO_POINT_OPS,
    RELU_LIKE,
    SAME_SCALE_OPS,
    Range,
    activation_inputs,
    drop_dequantization,
    excluded,
    is_float_activation,
    weight_array,
)

logger = logging.getLogger(__name__)


class Editor:
    """One quantization of one graph: decides params, then edits."""

    def __init__(
        self,
        graph: ir.Graph,
        config: QuantizeConfig,
        ranges: dict[str, Range],
        channels: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
        hessians: Mapping[str, np.ndarray] | None = None,
        power: Mapping[str, np.ndarray] | None = None,
        rounded: dict[tuple[object, ...], tuple[np.ndarray, float, float] | None] | None = None,
    ) -> None:
        self.graph, self.config, self.ranges = graph, config, ranges
        self.rounded = {} if rounded is None else rounded  # GPTQ results by quantize.rounding.memo_key
        self.channels = dict(channels or {})
        self.hessians = dict(hessians or {})
        self.power = dict(power or {})
        self.smoothed: list[dict[str, object]] = []
        self.hessian_of: dict[str, str] = {}  # weight name -> the name its Hessian was summed under
        self.output_error = {"nearest": 0.0, "gptq": 0.0}
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
            "smoothed": 0,
            "gptq_weights": 0,
            "nodes": 0,
        }
        self.changed = False

    def summary(self) -> dict[str, object]:
        summary: dict[str, object] = {"mode": "static", **self.counts, "reduce_range": self.reduce_range}
        if self.counts["gptq_weights"]:
            # summed over the rounded layers, each in its own input's units: a ratio, not an absolute figure
            summary["gptq_output_error_ratio"] = self.output_error["gptq"] / max(self.output_error["nearest"], 1e-30)
        if self.smoothed:
            summary["smoothing"] = self.smoothed
        return summary

    def run(self, nodes: list[ir.Node]) -> None:
        self.values = {v.name: v for v in self.graph.inputs if v.name}
        self.values.update({out.name: out for node in self.graph for out in node.outputs if out.name})
        selected = {id(n) for n in nodes}
        self._smooth(nodes)
        splits = self._plan_outliers(nodes, selected)
        for node in nodes:
            # An output no quantized op reads stays float: ORT then runs the producer as
            # MatMulIntegerToFloat (bias Add fused) instead of QLinearMatMul -> DQ -> Add.
            read = [v for v in node.outputs if self._output_quantized(v, selected)]
            for value in [*activation_inputs(node), *read]:
                if is_float_activation(value) and value.name not in self.params:
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

    def _smooth(self, nodes: list[ir.Node]) -> None:
        """SmoothQuant the MatMul inputs where it predicts less int8 error (before outliers and scales)."""
        if not self.config.smooth or not self.power or not self.config.per_channel:
            return  # per-tensor weight scales would absorb the outliers moved into one row
        qmax = affine.qrange(
            self.config.weight_type, symmetric=self.config.weight_symmetric, reduce_range=self.reduce_range
        )[1]
        skip = self.skipped | {n for n in self.channels if n not in self.ranges} | set(self.config.tensor_types)
        for plan in quantize_smooth.plan(nodes, self.channels, self.power, qmax, skip):
            targets, renamed = quantize_smooth.apply(self.graph, plan, self.values, self.taken)
            for name, target in targets.items():
                lo, hi = self.channels[name]
                lo, hi = lo / plan.scales, hi / plan.scales
                self.ranges[target.name] = (float(lo.min()), float(hi.max()))
                self.channels[target.name] = (lo, hi)
                self.values[target.name] = target
            for new, old in renamed.items():
                hessian = self.hessians.get(self.hessian_of.get(old, old))
                if hessian is not None:
                    self.hessians[new] = quantize_smooth.rescale_hessian(hessian, plan.scales)
            self.counts["smoothed"] += len(plan.names)
            self.smoothed.append(
                {"tensors": plan.names, "alpha": plan.alpha, "predicted_error_ratio": round(plan.error_ratio, 3)}
            )

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
        # a split weight (outlier rows zeroed, kept zero by GPTQ) is rounded with its original's Hessian
        self.hessian_of.update({s.node.inputs[1].name: s.weight_name for s in splits if s.node.inputs[1] is not None})
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
        if weight is None or weight.dtype != ir.DataType.FLOAT:
            return
        array = weight_array(weight)
        if array is None:
            return
        axis = (
            affine.weight_channel_axis(node.op_type, rank=array.ndim, trans_b=edit.trans_b(node))
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
        dq_out = self._weight_dq(weight, array, params, omit_zero=omit_zero, node=node)
        node.replace_input_with(w_index, dq_out)
        edit.drop_if_unused(self.graph, weight)
        drop_dequantization(self.graph, weight)
        self._bias(node, b_index, params)

    def _weight_dq(
        self,
        weight: ir.Value,
        array: np.ndarray,
        params: affine.QuantParams,
        *,
        omit_zero: bool = False,
        node: ir.Node | None = None,
    ) -> ir.Value:
        key = f"{weight.name}|{params.axis}|{omit_zero}"
        if key not in self.weights:
            quantized = self._rounded(weight, array, params, node)
            dq = qdq.insert_weight_dq(self.graph, weight, quantized, params, self.taken, omit_zero=omit_zero)
            self.weights[key] = dq
            self.counts["weights"] += 1
        return self.weights[key]

    def _rounded(
        self, weight: ir.Value, array: np.ndarray, params: affine.QuantParams, node: ir.Node | None
    ) -> np.ndarray:
        """The weight's integer codes: GPTQ's where calibration summed its Hessian, else round-to-nearest."""
        hessian = self.hessians.get(self.hessian_of.get(weight.name, weight.name)) if node is not None else None
        if hessian is not None:
            symmetric = self.config.weight_symmetric
            key = quantize_rounding.memo_key(array, params, hessian, node, symmetric, self.reduce_range)
            if key not in self.rounded:
                self.rounded[key] = quantize_rounding.round_weight(
                    array, params, hessian, node, symmetric=symmetric, reduce_range=self.reduce_range
                )
            found = self.rounded[key]
            if found is not None:
                codes, nearest, rounded = found
                self.output_error["nearest"] += nearest
                self.output_error["gptq"] += rounded
                self.counts["gptq_weights"] += 1
                return codes.copy()  # the memo's array stays the memo's
        return params.quantize(array)

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
            if value is None or value.const_value is None or value.dtype != ir.DataType.FLOAT:
                continue
            if not edit.finite(value):  # an additive mask of -inf stays float: its scale would be infinite
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
