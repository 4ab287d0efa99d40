"""Q/DQ graph edits of the quantization passes: Q/DQ pairs, quantized weights, biases and tables.

Every helper names its new values after the tensor it quantizes (``<name>_quantized``,
``<name>_scale``, ...) with a uniquifying suffix when needed, and keeps shapes and types
on the new values so ONNX Runtime and the checker see a fully typed graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.numerics.affine import QuantParams
from graphopt.passes import edit
from graphopt.passes.edit import add_initializer, drop_if_unused, replace_node, unique_name

_IR_TYPES = {
    "int8": ir.DataType.INT8,
    "uint8": ir.DataType.UINT8,
    "int16": ir.DataType.INT16,
    "uint16": ir.DataType.UINT16,
    "int4": ir.DataType.INT4,
    "uint4": ir.DataType.UINT4,
    "int32": ir.DataType.INT32,
}


def param_values(
    graph: ir.Graph, base: str, params: QuantParams, taken: set[str], *, omit_zero: bool = False
) -> tuple[ir.Value, ir.Value | None]:
    """Initializers for the scale and zero point of ``params``.

    With ``omit_zero`` an all-zero zero point of a signed type is left out (None): the
    DequantizeLinear default, one initializer fewer per quantized tensor.
    """
    scale = add_initializer(graph, unique_name(graph, f"{base}_scale", taken), params.scale.astype(np.float32))
    if omit_zero and params.qtype.startswith("int") and not np.any(params.zero_point):
        return scale, None
    zp_type = _IR_TYPES[params.qtype]
    zero = add_initializer(graph, unique_name(graph, f"{base}_zero_point", taken), params.zero_point, zp_type)
    return scale, zero


def _axis_attrs(params: QuantParams) -> dict[str, int]:
    return {"axis": params.axis} if params.axis is not None else {}


def insert_qdq(
    graph: ir.Graph, value: ir.Value, params: QuantParams, taken: set[str], source: ir.Value | None = None
) -> ir.Value:
    """Insert ``Q -> DQ`` after ``value`` and make its consumers read the DQ output.

    ``source`` (default: ``value``) is what the Q node reads; giving another value lets a
    removed ReLU's output be quantized straight from the ReLU's input. Graph outputs keep
    reading the float value, so output names and types are unchanged.
    """
    source = source if source is not None else value
    scale, zero = param_values(graph, value.name, params, taken)
    q_out = ir.Value(
        name=unique_name(graph, f"{value.name}_QuantizeLinear", taken),
        shape=value.shape,
        type=ir.TensorType(_IR_TYPES[params.qtype]),
    )
    dq_out = ir.Value(
        name=unique_name(graph, f"{value.name}_DequantizeLinear", taken), shape=value.shape, type=value.type
    )
    q = ir.node("QuantizeLinear", [source, scale, zero], _axis_attrs(params), outputs=[q_out], name=q_out.name)
    dq = ir.node("DequantizeLinear", [q_out, scale, zero], _axis_attrs(params), outputs=[dq_out], name=dq_out.name)
    for node, index in list(value.uses()):
        if node is not q:
            node.replace_input_with(index, dq_out)
    anchor = source.producer()
    if anchor is not None and anchor.graph is graph:
        graph.insert_after(anchor, [q, dq])
    else:
        graph.insert_before(next(iter(graph)), [q, dq])
    return dq_out


def insert_weight_dq(
    graph: ir.Graph,
    weight: ir.Value,
    quantized: np.ndarray,
    params: QuantParams,
    taken: set[str],
    *,
    omit_zero: bool = False,
) -> ir.Value:
    """Store ``quantized`` as an initializer and feed it through a DequantizeLinear.

    ``omit_zero`` leaves out an all-zero signed zero point (see :func:`param_values`).
    """
    stored = add_initializer(
        graph, unique_name(graph, f"{weight.name}_quantized", taken), quantized, _IR_TYPES[params.qtype]
    )
    scale, zero = param_values(graph, weight.name, params, taken, omit_zero=omit_zero)
    dq_out = ir.Value(
        name=unique_name(graph, f"{weight.name}_DequantizeLinear", taken), shape=weight.shape, type=weight.type
    )
    inputs = [stored, scale] if zero is None else [stored, scale, zero]
    dq = ir.node("DequantizeLinear", inputs, _axis_attrs(params), outputs=[dq_out], name=dq_out.name)
    graph.insert_before(next(iter(graph)), dq)
    return dq_out


def quantize_gather_table(graph: ir.Graph, node: ir.Node, taken: set[str]) -> bool:
    """Store a Gather's constant [rows, dim] table as int8 with one scale per row.

    The lookup runs on the int8 table and only the gathered rows are dequantized
    (Gather scales, Cast, Mul), so the model shrinks 4x without dequantizing the whole
    table on every run. Returns False (graph untouched) when the node does not fit.
    """
    table, indices = node.inputs[0], node.inputs[1] if len(node.inputs) > 1 else None
    if table is None or indices is None or table.const_value is None or table.dtype != ir.DataType.FLOAT:
        return False
    if node.attributes.get_int("axis", 0) != 0 or len(table.const_value.shape) != 2 or len(table.uses()) != 1:
        return False
    if not edit.finite(table):  # a -inf padding row: an infinite scale would read back as NaN
        return False
    array = table.const_value.numpy()
    absmax = np.abs(array).max(axis=1, keepdims=True)
    scales = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(array / scales), -127, 127).astype(np.int8)
    table_q = add_initializer(graph, unique_name(graph, f"{table.name}_quantized", taken), quantized)
    table_s = add_initializer(graph, unique_name(graph, f"{table.name}_row_scale", taken), scales)
    out = node.outputs[0]
    rows_q = ir.Value(name=unique_name(graph, f"{out.name}_int8", taken), type=ir.TensorType(ir.DataType.INT8))
    rows_s = ir.Value(name=unique_name(graph, f"{out.name}_row_scale", taken), type=ir.TensorType(ir.DataType.FLOAT))
    rows_f = ir.Value(name=unique_name(graph, f"{out.name}_float", taken), type=ir.TensorType(ir.DataType.FLOAT))
    result = ir.Value(name=unique_name(graph, f"{out.name}_dequantized", taken), shape=out.shape, type=out.type)
    new_nodes = [
        ir.node("Gather", [table_q, indices], {"axis": 0}, outputs=[rows_q], name=rows_q.name),
        ir.node("Gather", [table_s, indices], {"axis": 0}, outputs=[rows_s], name=rows_s.name),
        ir.node("Cast", [rows_q], {"to": ir.DataType.FLOAT}, outputs=[rows_f], name=rows_f.name),
        ir.node("Mul", [rows_f, rows_s], outputs=[result], name=result.name),
    ]
    replace_node(graph, node, new_nodes, result)
    drop_if_unused(graph, table)
    return True


def quantize_slice_table(graph: ir.Graph, node: ir.Node, taken: set[str]) -> bool:
    """Store a Slice's constant float table as int8 (one scale) and dequantize the slice.

    Learned position embeddings are read this way (``pos_emb[:seq]``). Returns False
    (graph untouched) when the node does not fit.
    """
    table = node.inputs[0]
    if table is None or table.const_value is None or table.dtype != ir.DataType.FLOAT or len(table.uses()) != 1:
        return False
    if not edit.finite(table):
        return False
    array = table.const_value.numpy()
    if array.size < 1024:
        return False
    absmax = float(np.abs(array).max())
    scale = np.float32(absmax / 127.0 if absmax > 0 else 1.0)
    quantized = np.clip(np.rint(array / scale), -127, 127).astype(np.int8)
    table_q = add_initializer(graph, unique_name(graph, f"{table.name}_quantized", taken), quantized)
    table_s = add_initializer(graph, unique_name(graph, f"{table.name}_scale", taken), np.asarray(scale, np.float32))
    out = node.outputs[0]
    sliced = ir.Value(name=unique_name(graph, f"{out.name}_int8", taken), type=ir.TensorType(ir.DataType.INT8))
    result = ir.Value(name=unique_name(graph, f"{out.name}_dequantized", taken), shape=out.shape, type=out.type)
    new_nodes = [
        ir.node("Slice", [table_q, *node.inputs[1:]], outputs=[sliced], name=sliced.name),
        ir.node("DequantizeLinear", [sliced, table_s], outputs=[result], name=result.name),
    ]
    replace_node(graph, node, new_nodes, result)
    drop_if_unused(graph, table)
    return True
