"""Static QDQ quantization: calibrated Q/DQ pairs placed where ONNX Runtime fuses them."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import onnx_ir as ir

from graphopt.errors import PassError
from graphopt.passes.edit import infer_types
from graphopt.passes.quantize import layout as quantize_layout
from graphopt.passes.quantize import qdq
from graphopt.passes.quantize.config import QuantizeConfig, min_opset, resolve_reduce_range
from graphopt.passes.quantize.dynamic import quantize_matmul
from graphopt.passes.quantize.editor import Editor
from graphopt.passes.quantize.select import ALREADY_QUANTIZED, Range, excluded, selected_nodes

logger = logging.getLogger(__name__)


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
        self.hessians = dict(getattr(ranges, "hessians", {}))
        self.power = dict(getattr(ranges, "power", {}))
        self.rounded = getattr(ranges, "rounded", None)  # not copied: the fallback's trials share it
        self.details: dict[str, object] = {}
        self.notes: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if any(n.op_type in ALREADY_QUANTIZED and n.domain in ("", "ai.onnx") for n in graph):
            logger.info("quantize: the model already holds Q/DQ or integer ops; left unchanged")
            self.details = {"skipped": "already quantized"}
            return ir.passes.PassResult(model, modified=False)
        infer_types(model)
        if not self._has_work(model):
            self.details = {"skipped": self._why_no_work(model)}
            return ir.passes.PassResult(model, modified=False)
        skip = self._fit_opset(model)
        if skip:
            self.details = {"skipped": skip}
            return ir.passes.PassResult(model, modified=False)
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
        editor = Editor(graph, self.config, self.ranges, self.channels, self.hessians, self.power, self.rounded)
        editor.counts["mean_to_pool"] = pools
        editor.run(selected_nodes(graph, self.config))
        self.details = {**editor.summary(), **({"notes": self.notes} if self.notes else {})}
        return ir.passes.PassResult(model, modified=editor.changed or bool(pools))

    def _fit_opset(self, model: ir.Model) -> str | None:
        """Adapt to a model below the opset the config wants (the pipeline converts when it can).

        Per-channel Q/DQ needs opset 13: at opset 10-12 the weights get one scale per tensor
        instead; below opset 10 (no QuantizeLinear) the model is left as it is. Returns why the
        pass must skip the model, or None.
        """
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset >= min_opset(self.config):
            return None
        if min_opset(self.config) > 13:
            raise PassError(
                f"quantize: 16-bit Q/DQ types need opset 21 and the model (opset {opset}) could not be converted "
                "with outputs unchanged; use 8-bit types (activation_type: uint8)."
            )
        if opset < (11 if self.dynamic else 10):
            logger.warning("quantize: opset %d has no Q/DQ ops; the model is left unchanged", opset)
            return f"opset {opset} has no Q/DQ operators"
        if self.config.per_channel:
            logger.warning("quantize: opset %d has no per-channel Q/DQ; weights get one scale per tensor", opset)
            self.config = dataclasses.replace(self.config, per_channel=False)
            self.notes = [f"opset {opset}: per-tensor weight scales (per-channel Q/DQ needs opset 13)"]
        return None

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

    def _why_no_work(self, model: ir.Model) -> str:
        """Why nothing is quantized, and what would change that."""
        static_ops = {n.op_type for n in selected_nodes(model.graph, self.config)}
        if self.dynamic and static_ops:
            return (
                f"nothing to quantize: dynamic mode (no calibration data) takes MatMuls with constant weights; "
                f"this model's "
                f"{', '.join(sorted(static_ops))} need static mode: give calibration data (--calib DATA)"
            )
        compute = [n for n in model.graph if n.op_type in ("Conv", "MatMul", "Gemm") and n.domain in ("", "ai.onnx")]
        left_out = [n for n in compute if excluded(n, self.config)]
        if compute and len(left_out) == len(compute):
            # the accuracy or latency search (or the recipe) kept every one in float: say so, not "none here"
            return f"nothing to quantize: all {len(compute)} Conv/MatMul/Gemm are excluded (kept in float)"
        return "nothing to quantize: no float32 Conv/MatMul/Gemm with a constant weight that is not excluded"

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
            **({"notes": self.notes} if self.notes else {}),
        }
        return ir.passes.PassResult(model, modified=bool(count or embeddings))
