"""Exact rewrites before quantization that let ONNX Runtime keep more of a graph in integers.

A CNN's global average pooling usually reaches ONNX as ``ReduceMean`` over the spatial
axes (PyTorch's ``AdaptiveAvgPool2d(1)`` and ``x.mean((2, 3))`` both export that way). ORT
has no quantized ReduceMean: its QDQ graph dequantizes, reduces in float and quantizes
again, and its NHWC layout pass must transpose back to NCHW first. ``GlobalAveragePool``
computes the same values and ORT fuses it into ``QLinearGlobalAveragePool``, which runs
channels-last on the uint8 tensor.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

import onnx_ir as ir

from graphopt.passes import edit

Range = tuple[float, float]


def spatial_means_to_pools(
    graph: ir.Graph, wanted: Callable[[ir.Node], bool], ranges: MutableMapping[str, Range]
) -> int:
    """Replace ``ReduceMean`` over axes (2, 3) of a 4-D float tensor with ``GlobalAveragePool``.

    Only nodes ``wanted`` accepts are rewritten. The result keeps the ReduceMean's name and
    output name (so calibrated ranges and exclusions still apply); ``keepdims=0`` adds a
    ``Flatten``, whose input gets the output's range. Returns the number of nodes rewritten.
    """
    taken: set[str] = set()
    count = 0
    for node in list(graph):
        if not (node.op_type == "ReduceMean" and node.domain in ("", "ai.onnx") and wanted(node)):
            continue
        axes = _spatial_axes(node, graph.opset_imports.get("", 0))
        data = node.inputs[0]
        if axes is None or data is None or data.shape is None or len(data.shape) != 4 or axes != {2, 3}:
            continue
        out = node.outputs[0]
        keepdims = node.attributes.get_int("keepdims", 1)
        name = node.name or edit.unique_name(graph, "GlobalAveragePool", taken)
        if keepdims:
            pooled = ir.Value(name=edit.unique_name(graph, f"{out.name}_pooled", taken), shape=out.shape, type=out.type)
            new_nodes = [ir.node("GlobalAveragePool", [data], outputs=[pooled], name=name)]
            result = pooled
        else:
            shape = ir.Shape([data.shape[0], data.shape[1], 1, 1])
            pooled = ir.Value(name=edit.unique_name(graph, f"{out.name}_pooled", taken), shape=shape, type=out.type)
            result = ir.Value(name=edit.unique_name(graph, f"{out.name}_flat", taken), shape=out.shape, type=out.type)
            new_nodes = [
                ir.node("GlobalAveragePool", [data], outputs=[pooled], name=name),
                ir.node("Flatten", [pooled], {"axis": 1}, outputs=[result], name=f"{name}_flatten"),
            ]
            if out.name in ranges:
                ranges[pooled.name] = ranges[out.name]
        old_axes = node.inputs[1] if len(node.inputs) > 1 else None
        edit.replace_node(graph, node, new_nodes, result)
        if old_axes is not None:
            edit.drop_if_unused(graph, old_axes)
        count += 1
    return count


def _spatial_axes(node: ir.Node, opset: int) -> set[int] | None:
    """The reduced axes (normalized for rank 4), or None when not constant/known."""
    if opset >= 18:
        axes_value = node.inputs[1] if len(node.inputs) > 1 else None
        if axes_value is None or axes_value.const_value is None:
            return None
        axes = [int(a) for a in axes_value.const_value.numpy().reshape(-1)]
    else:
        attr = node.attributes.get("axes")
        if attr is None:
            return None
        axes = list(attr.as_ints())
    return {a % 4 for a in axes} if axes else None
