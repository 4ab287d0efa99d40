"""Dynamic quantization of MatMuls: int8 weights, activation scales computed at run time.

Emitted with standard ONNX ops (DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul),
which ONNX Runtime's CPU EP fuses into DynamicQuantizeMatMul. Conv is deliberately not
handled: ConvInteger is several times slower than float Conv on ORT's CPU EP.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.numerics import affine
from graphopt.passes import edit
from graphopt.passes.quantize import qdq


def quantize_matmul(graph: ir.Graph, node: ir.Node, *, per_channel: bool, reduce_range: bool, taken: set[str]) -> bool:
    """Rewrite one ``MatMul(x, W)`` with a constant 2-D float W; False when it does not fit."""
    x, weight = node.inputs[0], node.inputs[1]
    if x is None or weight is None or weight.const_value is None or weight.dtype != ir.DataType.FLOAT:
        return False
    if x.dtype != ir.DataType.FLOAT or len(weight.const_value.shape) != 2:
        return False
    array = weight.const_value.numpy()
    params = affine.weight_params(
        array, "int8", axis=1 if per_channel else None, symmetric=True, reduce_range=reduce_range
    )
    base = node.outputs[0].name or weight.name
    w_name = edit.unique_name(graph, f"{weight.name}_quantized", taken)
    w_q = edit.add_initializer(graph, w_name, params.quantize(array))
    w_s, w_zp = qdq.param_values(graph, weight.name, params, taken)

    def value(suffix: str, dtype: ir.DataType) -> ir.Value:
        return ir.Value(name=edit.unique_name(graph, f"{base}_{suffix}", taken), type=ir.TensorType(dtype))

    x_q, x_s, x_zp = (
        value("x_quantized", ir.DataType.UINT8),
        value("x_scale", ir.DataType.FLOAT),
        value("x_zero_point", ir.DataType.UINT8),
    )
    acc, acc_f, scale = (
        value("int32", ir.DataType.INT32),
        value("float", ir.DataType.FLOAT),
        value("scale", ir.DataType.FLOAT),
    )
    out = node.outputs[0]
    result = ir.Value(name=edit.unique_name(graph, f"{base}_dynamic", taken), shape=out.shape, type=out.type)
    new_nodes = [
        ir.node("DynamicQuantizeLinear", [x], outputs=[x_q, x_s, x_zp], name=x_q.name),
        ir.node("MatMulInteger", [x_q, w_q, x_zp, w_zp], outputs=[acc], name=acc.name),
        ir.node("Cast", [acc], {"to": ir.DataType.FLOAT}, outputs=[acc_f], name=acc_f.name),
        ir.node("Mul", [x_s, w_s], outputs=[scale], name=scale.name),
        ir.node("Mul", [acc_f, scale], outputs=[result], name=result.name),
    ]
    edit.replace_node(graph, node, new_nodes, result)
    edit.drop_if_unused(graph, weight)
    return True
