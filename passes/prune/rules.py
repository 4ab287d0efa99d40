"""How channels travel through one op: the per-op rules of channel-group discovery.

:func:`follow` takes a node and one of its tensors that carries a group's channels, and
returns the node's other tensors that carry them too (with their axis and scale), the
constants that must be cut along with them (a BatchNorm's statistics, a bias added
element-wise), and whether the node itself must be edited (a Reshape's target, a
depthwise Conv's ``group``). An op it does not
know raises :class:`Unprunable`, which leaves the whole group alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import onnx_ir as ir


class Unprunable(Exception):
    """The channels of a group reach something that cannot follow their removal."""


@dataclass(frozen=True)
class Member:
    """A tensor in a channel group: the axis that holds the channels, elements per channel."""

    value: ir.Value
    axis: int
    scale: Fraction


# A tensor the channels reach through a node, not yet checked against the group.
Link = Member


@dataclass(frozen=True)
class WeightSlice:
    """A constant input of ``node`` to cut along ``axis`` when channels are removed."""

    node: ir.Node
    index: int
    axis: int
    scale: Fraction


# (tensors that carry the channels too, constants to cut, whether the node itself needs an edit)
Rule = tuple[list[Link], list[WeightSlice], bool]

UNARY = frozenset(
    {
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Gelu", "HardSigmoid", "HardSwish", "Softplus", "Softsign",
        "Elu", "Selu", "Celu", "Mish", "Exp", "Log", "Sqrt", "Neg", "Abs", "Reciprocal", "Identity", "Cast",
        "Clip", "Dropout", "Floor", "Ceil", "Round", "Sin", "Cos", "ThresholdedRelu",
    }
)  # fmt: skip
BROADCAST = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Where", "PRelu", "Sum", "Mean"})
POOLS = frozenset({"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"})
REDUCE = frozenset(
    {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd", "ReduceSumSquare"}
)
RESHAPES = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze"})


def follow(node: ir.Node, member: Member, base: int) -> Rule:
    """The tensors, constants and shape edits that ``node`` ties to ``member``'s channels."""
    if node.domain not in ("", "ai.onnx"):
        raise Unprunable(f"{node.domain}::{node.op_type} {node.name!r} is not a standard op")
    op = node.op_type
    if op in UNARY or op in ("Softmax", "LogSoftmax"):
        return _unary(node, member), [], False
    if op in BROADCAST:
        return _broadcast(node, member, base)
    if op in ("BatchNormalization", "InstanceNormalization"):
        return _channel_first(node, member, range(1, len(node.inputs)))
    if op in POOLS:
        return _channel_first(node, member, ())
    if op == "Conv":
        return _depthwise(node, member)
    if op == "LayerNormalization":
        return _layer_norm(node, member)
    if op in REDUCE:
        return _reduce(node, member), [], False
    if op == "Transpose":
        return _transpose(node, member), [], False
    if op in RESHAPES:
        return _reshape(node, member)
    if op in ("Concat", "Split"):
        return _concat_split(node, member)
    if op == "MatMul":
        return _matmul(node, member)
    raise Unprunable(f"{op} {node.name!r} reads the channels and has no pruning rule")


def shape_of(value: ir.Value) -> tuple[int | object, ...]:
    """Dims of a constant or a typed tensor; raises when they are unknown."""
    if value.const_value is not None:
        return tuple(value.const_value.shape)
    if value.shape is None:
        raise Unprunable(f"{value.name!r} has no known shape")
    return tuple(value.shape)


def _used_outputs(node: ir.Node) -> list[ir.Value]:
    return [out for out in node.outputs if out.uses() or out.is_graph_output()]


def _other_side(node: ir.Node, member: Member) -> ir.Value:
    """The output when ``member`` is input 0, the input 0 when it is output 0."""
    if len(_used_outputs(node)) > 1:
        raise Unprunable(f"{node.op_type} {node.name!r} has more than one output in use")
    if member.value is node.inputs[0]:
        return node.outputs[0]
    if member.value is node.outputs[0] and node.inputs[0] is not None:
        return node.inputs[0]
    raise Unprunable(f"channels enter {node.op_type} {node.name!r} through a parameter input")


def _unary(node: ir.Node, member: Member) -> list[Link]:
    if node.op_type in ("Softmax", "LogSoftmax"):
        rank = len(shape_of(member.value))
        if node.attributes.get_int("axis", -1) % rank == member.axis:
            raise Unprunable(f"{node.op_type} {node.name!r} normalizes over the channels")
    return [Link(_other_side(node, member), member.axis, member.scale)]


def _broadcast(node: ir.Node, member: Member, base: int) -> Rule:
    out = node.outputs[0]
    out_rank = len(shape_of(out))
    out_axis = member.axis + out_rank - len(shape_of(member.value))
    links = [] if member.value is out else [Link(out, out_axis, member.scale)]
    slices = []
    for index, value in enumerate(node.inputs):
        if value is None or value is member.value:
            continue
        shape = shape_of(value)
        axis = out_axis - (out_rank - len(shape))
        if axis < 0 or shape[axis] == 1:
            continue  # broadcast over the channels: nothing to cut
        if value.const_value is None:
            links.append(Link(value, axis, member.scale))
        elif shape[axis] == base * member.scale:
            slices.append(WeightSlice(node, index, axis, member.scale))
        else:
            raise Unprunable(f"constant {value.name!r} of {node.op_type} {node.name!r} does not match the channels")
    return links, slices, False


def _channel_first(node: ir.Node, member: Member, params: range | tuple[()]) -> Rule:
    """BatchNorm/InstanceNorm/pooling: channels on axis 1, per-channel parameters on axis 0."""
    if member.axis != 1:
        raise Unprunable(f"{node.op_type} {node.name!r} keeps channels on axis 1, not {member.axis}")
    slices = []
    for index in params:
        value = node.inputs[index]
        if value is None:
            continue
        if value.const_value is None:
            raise Unprunable(f"parameter {value.name!r} of {node.op_type} {node.name!r} is not a constant")
        slices.append(WeightSlice(node, index, 0, member.scale))
    return [Link(_other_side(node, member), 1, member.scale)], slices, False


def _depthwise(node: ir.Node, member: Member) -> Rule:
    """A depthwise Conv (one filter per channel) passes channels through; cut its filters."""
    weight = node.inputs[1]
    shape = tuple(weight.const_value.shape) if weight is not None and weight.const_value is not None else ()
    group = node.attributes.get_int("group", 1)
    if not shape or shape[1] != 1 or shape[0] != group or group == 1:
        raise Unprunable(f"Conv {node.name!r} mixes channels (group={group}) and is no producer/consumer")
    links, slices, _ = _channel_first(node, member, range(1, len(node.inputs)))
    return links, slices, True  # its group attribute follows the channel count


def _layer_norm(node: ir.Node, member: Member) -> Rule:
    rank = len(shape_of(member.value))
    if member.axis >= node.attributes.get_int("axis", -1) % rank:
        raise Unprunable(f"LayerNormalization {node.name!r} normalizes over the channels")
    return [Link(_other_side(node, member), member.axis, member.scale)], [], False


def _reduce_axes(node: ir.Node, rank: int) -> list[int]:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        if node.inputs[1].const_value is None:
            raise Unprunable(f"{node.op_type} {node.name!r} has axes that are not constant")
        axes = [int(a) for a in node.inputs[1].const_value.numpy().ravel()]
    else:
        attr = node.attributes.get("axes")
        axes = [int(a) for a in attr.value] if attr is not None else []
    if not axes:
        raise Unprunable(f"{node.op_type} {node.name!r} reduces over all axes")
    return sorted(a % rank for a in axes)


def _reduce(node: ir.Node, member: Member) -> list[Link]:
    rank = len(shape_of(node.inputs[0]))  # type: ignore[arg-type]
    axes = _reduce_axes(node, rank)
    keep = node.attributes.get_int("keepdims", 1)
    kept_axes = list(range(rank)) if keep else [a for a in range(rank) if a not in axes]
    if member.value is node.inputs[0]:
        if member.axis in axes:
            raise Unprunable(f"{node.op_type} {node.name!r} reduces over the channels")
        return [Link(node.outputs[0], kept_axes.index(member.axis), member.scale)]
    return [Link(_other_side(node, member), kept_axes[member.axis], member.scale)]


def _transpose(node: ir.Node, member: Member) -> list[Link]:
    rank = len(shape_of(member.value))
    attr = node.attributes.get("perm")
    perm = [int(p) for p in attr.value] if attr is not None else list(reversed(range(rank)))
    axis = perm.index(member.axis) if member.value is node.inputs[0] else perm[member.axis]
    return [Link(_other_side(node, member), axis, member.scale)]


def map_reshape(
    source: tuple[object, ...], axis: int, scale: Fraction, target: tuple[object, ...]
) -> tuple[int, Fraction] | None:
    """Where the channels on ``source[axis]`` land in ``target`` (same data, other shape).

    The channel axis and everything after it must be static; it maps to the last axis
    ``b`` of the target whose trailing block has the same number of elements. A split
    (384 -> 12 x 32) divides the scale by the trailing size, a merge multiplies it.
    """
    tail = source[axis:]
    if not all(isinstance(d, int) for d in tail):
        return None
    total = math.prod(tail)  # type: ignore[arg-type]
    product = 1
    for b in range(len(target) - 1, -1, -1):
        if not isinstance(target[b], int):
            return None
        product *= target[b]  # type: ignore[operator]
        if product == total and target[b] != 1:
            after = math.prod(target[b + 1 :])  # type: ignore[arg-type]
            return b, scale * math.prod(tail[1:]) / after  # type: ignore[arg-type]
        if product > total:
            return None
    return None


def _reshape(node: ir.Node, member: Member) -> Rule:
    other = _other_side(node, member)
    mapped = map_reshape(shape_of(member.value), member.axis, member.scale, shape_of(other))
    if mapped is None:
        raise Unprunable(f"{node.op_type} {node.name!r} mixes the channels with other axes")
    link = Link(other, *mapped)
    if node.op_type != "Reshape":
        return [link], [], False
    out_axis = link.axis if other is node.outputs[0] else member.axis
    in_axis = member.axis if other is node.outputs[0] else link.axis
    reshape_entries(node, out_axis, in_axis)  # raises when the target cannot be rewritten
    return [link], [], True


def reshape_entries(node: ir.Node, out_axis: int, in_axis: int) -> tuple[ir.Value, int]:
    """The constant that holds the Reshape target's entry for ``out_axis``, and its offset.

    The target is a constant, or a Concat of 1-D pieces (exporters build it from Shape
    ops) in which the piece holding ``out_axis`` is a constant. An entry of 0 (copy the
    input dim) only works when the input has the channels at the same position.
    """
    target = node.inputs[1]
    if target is None:
        raise Unprunable(f"Reshape {node.name!r} has no target shape")
    piece, offset = target, out_axis
    if target.const_value is None:
        concat = target.producer()
        if concat is None or concat.op_type != "Concat":
            raise Unprunable(f"Reshape {node.name!r} has a computed target shape")
        piece, offset = _concat_piece(concat, out_axis)
    entry = int(piece.const_value.numpy().ravel()[offset])  # type: ignore[union-attr]
    if entry == 0 and not node.attributes.get_int("allowzero", 0) and in_axis != out_axis:
        raise Unprunable(f"Reshape {node.name!r} copies the channel dim from another input axis")
    return piece, offset


def _concat_piece(concat: ir.Node, position: int) -> tuple[ir.Value, int]:
    start = 0
    for value in concat.inputs:
        shape = shape_of(value) if value is not None else ()
        if len(shape) != 1 or not isinstance(shape[0], int):
            raise Unprunable(f"target shape piece {getattr(value, 'name', None)!r} has unknown length")
        if start <= position < start + shape[0]:
            if value.const_value is None:  # type: ignore[union-attr]
                raise Unprunable(f"the channel entry of the target shape comes from {value.name!r}, not a constant")  # type: ignore[union-attr]
            return value, position - start  # type: ignore[return-value]
        start += shape[0]
    raise Unprunable(f"Concat {concat.name!r} is shorter than the target shape")


def _concat_split(node: ir.Node, member: Member) -> Rule:
    rank = len(shape_of(member.value))
    if node.attributes.get_int("axis", 0) % rank == member.axis:
        raise Unprunable(f"{node.op_type} {node.name!r} joins or splits along the channels")
    links, slices = [], []
    values = [*node.inputs, *node.outputs] if node.op_type == "Concat" else [node.inputs[0], *node.outputs]
    for index, value in enumerate(values):
        if value is None or value is member.value:
            continue
        if value.const_value is not None:
            slices.append(WeightSlice(node, index, member.axis, member.scale))
        else:
            links.append(Link(value, member.axis, member.scale))
    return links, slices, False


def _matmul(node: ir.Node, member: Member) -> Rule:
    """Batched MatMul of two activations (attention): batch axes tie, M and N pass through."""
    values = (node.inputs[0], node.inputs[1], node.outputs[0])
    ranks = [len(shape_of(v)) for v in values]  # type: ignore[arg-type]
    if min(ranks) < 2:
        raise Unprunable(f"MatMul {node.name!r} has a 1-D operand")
    position = next(i for i, v in enumerate(values) if v is member.value)
    from_end = ranks[position] - member.axis  # 1: last axis, 2: second to last
    # (position, axis from the end) -> (position, axis from the end) for rows and columns.
    passing = {(0, 2): (2, 2), (2, 2): (0, 2), (1, 1): (2, 1), (2, 1): (1, 1)}
    if (position, from_end) in passing:
        target, target_end = passing[(position, from_end)]
        link = Link(values[target], ranks[target] - target_end, member.scale)  # type: ignore[arg-type]
        if values[target].const_value is not None:  # type: ignore[union-attr]
            return [], [WeightSlice(node, target, link.axis, member.scale)], False
        return [link], [], False
    if from_end <= 2:
        raise Unprunable(f"MatMul {node.name!r} contracts the channels of two activations")
    # A batch axis: every operand that has it at full size carries the channels.
    y_axis = member.axis + ranks[2] - ranks[position]
    links, slices = [], []
    for index, (value, rank) in enumerate(zip(values, ranks, strict=True)):
        axis = y_axis - (ranks[2] - rank)
        if value is member.value or axis < 0 or shape_of(value)[axis] == 1:  # type: ignore[arg-type]
            continue
        if value.const_value is not None:  # type: ignore[union-attr]
            slices.append(WeightSlice(node, index, axis, member.scale))
        else:
            links.append(Link(value, axis, member.scale))  # type: ignore[arg-type]
    return links, slices, False
