"""Graph edits of structured pruning: cut constants, rewrite Reshape targets, fix shapes.

Given a :class:`ChannelGroup` and the channels to keep, every constant tied to the
channels is cut along its axis, every Reshape whose target names the channel count gets
a new target, a depthwise Conv gets its new ``group`` count, and every member tensor's
recorded shape is updated, so the checker and ONNX Runtime see a consistent graph. A
constant read by one node only is replaced in place (its name stays, so reports and later
runs still recognise it); a shared one is copied first.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.passes.edit import add_initializer, drop_if_unused, unique_name
from graphopt.passes.prune.groups import ChannelGroup
from graphopt.passes.prune.rules import WeightSlice, reshape_entries


def kept_elements(kept: np.ndarray, unit: int) -> np.ndarray:
    """Indices along an axis for the kept channels, ``unit`` consecutive elements each."""
    return (kept[:, None] * unit + np.arange(unit)[None, :]).ravel()


def prune_group(graph: ir.Graph, group: ChannelGroup, kept: np.ndarray, taken: set[str]) -> dict[str, np.ndarray]:
    """Remove every channel of ``group`` not in ``kept``; return the kept elements per producer output."""
    for cut in group.slices:
        _cut(graph, cut, kept_elements(kept, group.unit(cut.scale)), taken)
    for node in group.rewrites:
        if node.op_type == "Reshape":
            _rewrite_target(graph, node, group, len(kept), taken)
        else:  # a depthwise Conv: one group per remaining channel
            member = group.members[node.outputs[0]]
            node.attributes["group"] = ir.AttrInt64("group", len(kept) * group.unit(member.scale))
    for member in group.members.values():
        dims = list(member.value.shape)  # type: ignore[arg-type]
        dims[member.axis] = len(kept) * group.unit(member.scale)
        member.value.shape = ir.Shape(dims)
    return {
        node.outputs[0].name: kept_elements(kept, group.unit(member.scale))
        for node, member in group.producers
        if node.outputs[0].name
    }


def _cut(graph: ir.Graph, cut: WeightSlice, elements: np.ndarray, taken: set[str]) -> None:
    value = cut.node.inputs[cut.index]
    assert value is not None and value.const_value is not None
    array = np.take(value.const_value.numpy(), elements, axis=cut.axis)
    replace_constant(graph, cut.node, cut.index, array, taken)


def replace_constant(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, taken: set[str]) -> None:
    """Give ``node`` input ``index`` the constant ``array``, in place when nobody else reads it."""
    value = node.inputs[index]
    assert value is not None
    alone = len(value.uses()) == 1 and not value.is_graph_output() and not value.is_graph_input()
    if alone and value.name in graph.initializers:
        value.const_value = ir.tensor(array, name=value.name)
        value.shape = ir.Shape(array.shape)
        return
    copy = add_initializer(graph, unique_name(graph, f"{value.name}_pruned", taken), array)
    node.replace_input_with(index, copy)
    drop_if_unused(graph, value)


def _rewrite_target(graph: ir.Graph, node: ir.Node, group: ChannelGroup, channels: int, taken: set[str]) -> None:
    """Give a Reshape a target with the new channel count (a -1 or 0 entry needs nothing)."""
    out, source = group.members[node.outputs[0]], group.members[node.inputs[0]]  # type: ignore[index]
    piece, offset = reshape_entries(node, out.axis, source.axis)
    entries = piece.const_value.numpy().copy()  # type: ignore[union-attr]
    if entries.ravel()[offset] in (-1, 0):
        return
    entries.ravel()[offset] = channels * group.unit(out.scale)
    target = node.inputs[1]
    assert target is not None
    if piece is target:
        replace_constant(graph, node, 1, entries, taken)
        return
    # The entry sits in a Concat that other Reshapes may share: build this one its own.
    concat = target.producer()
    assert concat is not None
    new_piece = add_initializer(graph, unique_name(graph, f"{piece.name}_pruned", taken), entries)
    inputs = [new_piece if v is piece else v for v in concat.inputs]
    result = ir.Value(name=unique_name(graph, f"{target.name}_pruned", taken), shape=target.shape, type=target.type)
    graph.insert_before(node, ir.node("Concat", inputs, {"axis": 0}, outputs=[result], name=result.name))
    node.replace_input_with(1, result)
    if not target.uses() and not target.is_graph_output():
        graph.remove(concat, safe=True)
