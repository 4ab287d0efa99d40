"""Which tensors and nodes the ``quantize`` pass rewrites: compute ops, integer islands, calibration targets."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphopt.passes import edit
from graphopt.passes.edit import infer_types
from graphopt.passes.quantize.config import QuantizeConfig

Range = tuple[float, float]


logger = logging.getLogger(__name__)

# op -> (weight input index, bias input index): weights quantized per channel to int8.
COMPUTE_OPS: dict[str, tuple[int, int | None]] = {"Conv": (1, 2), "MatMul": (1, None), "Gemm": (1, 2)}


# Ops whose output is a rearrangement of their input: same scale in and out, so ORT can
# run them on the integers directly (and drop the DQ -> op -> Q around them).
SAME_SCALE_OPS = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Slice", "Gather", "Resize"}
)


OMIT_ZERO_POINT_OPS = frozenset({"Conv", "MatMul"})


RELU_LIKE = frozenset({"Relu", "Clip"})


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
    if node.op_type == "Mul" and _dequantization(node.outputs[0]) is not None:
        return False  # an arriving weight's dequantization: its reader quantizes the weight itself
    if node.op_type in COMPUTE_OPS and not edit.finite(edit.weight_input(node)):  # tables: qdq's own check
        logger.info("quantize: %s reads a weight holding inf or NaN; left in float", node.name)
        return False
    return any(is_float_activation(v) for v in activation_inputs(node))


def _inside_island(node: ir.Node, chosen: set[int]) -> bool:
    for value in activation_inputs(node):
        producer = value.producer() if value is not None else None
        if is_float_activation(value) and producer is not None and id(producer) not in chosen:
            return False
    for out in node.outputs:
        if out.is_graph_output() or any(id(use.node) not in chosen for use in out.uses()):
            return False
    return True


def excluded(node: ir.Node, config: QuantizeConfig) -> bool:
    """Whether the user asked to keep ``node`` in float (unnamed nodes match no name)."""
    return edit.excluded(node, config.exclude, config.exclude_op_types)


def is_float_activation(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.const_value is None
        # float32 only: Q/DQ of float16 needs opset 19 and fp16 scales; float16 models stay as they are
        and value.dtype == ir.DataType.FLOAT
    )


_INTEGER_CODES = frozenset({ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16})


def _dequantization(value: ir.Value | None) -> tuple[ir.Node, ir.Value, ir.Value] | None:
    """``(mul, codes, scale)`` where ``value = Mul(Cast(codes), scale)`` (either operand order) with constant
    integer codes and a constant float32 scale: a weight that arrives quantized (an exporter's or a previous
    tool's int8 weights dequantized in the graph)."""
    mul = value.producer() if value is not None else None
    if mul is None or mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.inputs) != 2:
        return None
    for cast_out, scale in (mul.inputs, mul.inputs[::-1]):
        cast = cast_out.producer() if cast_out is not None else None
        if (
            cast is not None
            and cast.op_type == "Cast"
            and cast.domain in ("", "ai.onnx")
            and cast.attributes.get_int("to", 0) == ir.DataType.FLOAT
            and cast.inputs[0] is not None
            and cast.inputs[0].const_value is not None
            and cast.inputs[0].dtype in _INTEGER_CODES
            and scale is not None
            and scale.const_value is not None
            and scale.dtype == ir.DataType.FLOAT
        ):
            return mul, cast.inputs[0], scale
    return None


def weight_array(value: ir.Value | None) -> np.ndarray | None:
    """A compute op's weight as float32 values: a constant, or an arriving ``Mul(Cast(int codes), scale)``
    evaluated as ONNX Runtime would (exactly: integer to float32, one float32 product per element)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    found = _dequantization(value)
    if found is None:
        return None
    _, codes, scale = found
    return codes.const_value.numpy().astype(np.float32) * scale.const_value.numpy()  # type: ignore[union-attr]


def is_weight(value: ir.Value | None) -> bool:
    """Constant, or dequantized from constant integer codes in the graph (see :func:`weight_array`)."""
    return value is not None and (value.const_value is not None or _dequantization(value) is not None)


def drop_dequantization(graph: ir.Graph, value: ir.Value) -> None:
    """Remove an arriving ``Mul(Cast(codes), scale)`` chain (and its constants) that nothing reads any more."""
    found = _dequantization(value)
    if found is None or value.uses() or value.is_graph_output():
        return
    mul, codes, scale = found
    cast = next(v.producer() for v in mul.inputs if v is not scale)
    graph.remove(mul, safe=True)
    if cast is not None and not any(out.uses() or out.is_graph_output() for out in cast.outputs):
        graph.remove(cast, safe=True)
    edit.drop_if_unused(graph, codes)
    edit.drop_if_unused(graph, scale)


def activation_inputs(node: ir.Node) -> list[ir.Value | None]:
    indices = _ACT_INPUTS.get(node.op_type)
    if node.op_type in COMPUTE_OPS:
        weight = COMPUTE_OPS[node.op_type][0]
        return [v for i, v in enumerate(node.inputs) if i < 2 and (i != weight or v is None or not is_weight(v))]
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
        for value in [*activation_inputs(node), *node.outputs]:
            if is_float_activation(value) and value.name:
                names[value.name] = None
    return list(names)


class CalibratedRanges(dict[str, Range]):
    """What calibration gives the pass: ``{tensor: (min, max)}``, plus per-channel bounds and mean squares of
    MatMul inputs and the Hessians ``X^T X / n`` of the weights GPTQ rounds (``{weight: [groups, K, K]}``)."""

    def __init__(
        self,
        ranges: Mapping[str, Range] | None = None,
        channels: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
        hessians: Mapping[str, np.ndarray] | None = None,
        power: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__(ranges or {})
        self.channels = dict(channels or {})
        self.hessians = dict(hessians or {})
        self.power = dict(power or {})  # per-channel mean of x**2 of the same tensors as channels
        # GPTQ's codes per weight (see quantize.rounding.memo_key), shared by every run of the pass on these ranges
        self.rounded: dict[tuple[object, ...], tuple[np.ndarray, float, float] | None] = {}
