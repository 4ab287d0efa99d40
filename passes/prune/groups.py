"""Find the channel groups of a graph: tensors whose channels must be removed together.

A group starts at a *producer* (the output channels of a Conv, the output columns of a
MatMul/Gemm with a constant weight) and follows the channels through every op that keeps
them apart (activations, BatchNorm, pooling, Reshape, Transpose, batched MatMul of
attention, ...) until *consumers* reduce them away (the input channels of the next Conv,
MatMul or Gemm). Element-wise ops with two activation inputs tie their inputs together, so
a residual Add joins the producers on both of its sides into one group, pruned together.

Each member tensor records the axis that carries the channels and a *scale*: elements on
that axis per channel of the first producer. A Reshape that splits 384 channels into
12 heads x 32 gives the head axis scale 1/32, which makes whole heads the unit of pruning.
Anything the rules do not cover (a graph output, LayerNorm over the channels, a Concat
along them, an unknown op) makes the group unprunable, with the reason recorded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import onnx_ir as ir

from graphopt.passes.prune import rules
from graphopt.passes.prune.rules import Link, Member, Unprunable, WeightSlice

logger = logging.getLogger(__name__)


@dataclass
class ChannelGroup:
    """Tensors that share one set of channels, with the producers and consumers around them."""

    base: int
    members: dict[ir.Value, Member] = field(default_factory=dict)
    producers: list[tuple[ir.Node, Member]] = field(default_factory=list)
    consumers: list[tuple[ir.Node, Member]] = field(default_factory=list)
    slices: list[WeightSlice] = field(default_factory=list)
    rewrites: list[ir.Node] = field(default_factory=list)
    failure: str | None = None

    @property
    def granularity(self) -> int:
        """Channels of the first producer per prunable channel (the head size for attention)."""
        return math.lcm(*(m.scale.denominator for m in self.members.values()))

    @property
    def channels(self) -> int:
        return self.base // self.granularity

    def unit(self, scale: Fraction) -> int:
        """Elements along an axis with this scale that make up one prunable channel."""
        return int(scale * self.granularity)

    @property
    def kind(self) -> str:
        if any(node.op_type == "Conv" for node, _ in self.producers):
            return "conv"
        return "heads" if self.granularity > 1 else "mlp"

    @property
    def name(self) -> str:
        return "+".join(_weight_name(node) for node, _ in self.producers) or "?"


def _weight_name(node: ir.Node) -> str:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    return weight.name if weight is not None and weight.name else node.name or node.op_type


def producer_axis(node: ir.Node) -> int | None:
    """The output axis of ``node`` that holds prunable channels, or None if it is no producer."""
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    weight, out = node.inputs[1], node.outputs[0]
    if weight is None or weight.const_value is None or out.shape is None:
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and bias.const_value is None:
        return None
    if node.op_type == "Conv" and node.attributes.get_int("group", 1) == 1:
        return 1
    if node.op_type == "MatMul" and len(weight.const_value.shape) == 2 and len(out.shape) >= 2:
        return len(out.shape) - 1
    if node.op_type == "Gemm":
        return 1
    return None


def _consumer(node: ir.Node, index: int, axis: int, rank: int) -> bool:
    """Whether ``node`` reduces over channels arriving on input ``index`` at ``axis``."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if index != 0 or node.domain not in ("", "ai.onnx") or weight is None or weight.const_value is None:
        return False
    if node.op_type == "Conv":
        return axis == 1 and node.attributes.get_int("group", 1) == 1
    if node.op_type == "MatMul":
        return axis == rank - 1 and len(weight.const_value.shape) == 2
    if node.op_type == "Gemm":
        return axis == 1 and node.attributes.get_int("transA", 0) == 0
    return False


def producer_weight_axis(node: ir.Node) -> int:
    """The axis of a producer's weight that holds its output channels."""
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 0 if node.op_type == "Conv" else 1


def consumer_weight_axis(node: ir.Node) -> int:
    """The axis of a consumer's weight that meets its input channels."""
    if node.op_type == "Gemm":
        return 1 if node.attributes.get_int("transB", 0) else 0
    return 1 if node.op_type == "Conv" else 0


def _producer_slices(node: ir.Node, member: Member) -> list[WeightSlice]:
    """The constants cut when output channels of producer ``node`` go."""
    slices = [WeightSlice(node, 1, producer_weight_axis(node), member.scale)]
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and bias.const_value is not None:
        shape = tuple(bias.const_value.shape)
        if shape and shape[-1] != 1:
            slices.append(WeightSlice(node, 2, len(shape) - 1, member.scale))
    return slices


def _consumer_slice(node: ir.Node, member: Member) -> WeightSlice:
    """The constant cut when input channels of consumer ``node`` go."""
    return WeightSlice(node, 1, consumer_weight_axis(node), member.scale)


class GroupFinder:
    """Walks the graph from each producer and collects its :class:`ChannelGroup`.

    Attributes:
        excluded: Tells whether the user asked to leave a producer node alone.
    """

    def __init__(self, excluded: Callable[[ir.Node], bool]) -> None:
        self.excluded = excluded
        self.graph: ir.Graph | None = None

    def find_all(self, graph: ir.Graph) -> list[ChannelGroup]:
        """Every group of ``graph``'s main graph, prunable or not, in topological order."""
        self.graph = graph
        groups: list[ChannelGroup] = []
        claimed: set[ir.Value] = set()
        for node in graph:
            axis = producer_axis(node)
            if axis is None or node.outputs[0] in claimed:
                continue
            group = self.find(node, axis)
            claimed.update(group.members)
            claimed.add(node.outputs[0])
            groups.append(group)
            if group.failure:
                logger.debug("prune_structured: %s left alone: %s", group.name, group.failure)
        return groups

    def find(self, producer: ir.Node, axis: int) -> ChannelGroup:
        out = producer.outputs[0]
        dim = out.shape[axis] if out.shape is not None else None
        group = ChannelGroup(base=dim if isinstance(dim, int) else 0)
        try:
            if not isinstance(dim, int) or dim < 2:
                raise Unprunable(f"output {out.name!r} has {dim!r} channels on axis {axis}")
            self._walk(group, Link(out, axis, Fraction(1)))
            if group.base % group.granularity:
                raise Unprunable(f"{group.base} channels do not split into units of {group.granularity}")
        except Unprunable as exc:
            group.failure = str(exc)
            group.producers = group.producers or [(producer, Member(out, axis, Fraction(1)))]
        return group

    def _walk(self, group: ChannelGroup, start: Link) -> None:
        queue, expanded = [start], set()
        while queue:
            link = queue.pop()
            member = self._admit(group, link)
            if member is None:
                continue
            value = member.value
            node = value.producer()
            if node is None:
                raise Unprunable(f"{value.name!r} is a graph input")
            if producer_axis(node) == member.axis and value is node.outputs[0]:
                self._add_producer(group, node, member)
            elif node not in expanded:
                expanded.add(node)
                queue.extend(self._expand(group, node, member))
            for user, index in value.uses():
                if self.graph is not None and user.graph is not self.graph:
                    raise Unprunable(f"{value.name!r} is read inside a subgraph (by {user.op_type} {user.name!r})")
                if _consumer(user, index, member.axis, len(value.shape)):  # type: ignore[arg-type]
                    if all(user is not n for n, _ in group.consumers):
                        group.consumers.append((user, member))
                        group.slices.append(_consumer_slice(user, member))
                elif user not in expanded:
                    expanded.add(user)
                    queue.extend(self._expand(group, user, member))

    def _admit(self, group: ChannelGroup, link: Link) -> Member | None:
        """Add ``link`` as a member; None when it is one already (same axis and scale)."""
        value = link.value
        known = group.members.get(value)
        if known is not None:
            if (known.axis, known.scale) != (link.axis, link.scale):
                raise Unprunable(f"{value.name!r} carries the channels on two different axes")
            return None
        if value.is_graph_output():
            raise Unprunable(f"the channels reach graph output {value.name!r}")
        if value.shape is None:
            raise Unprunable(f"{value.name!r} has no known shape")
        dim = value.shape[link.axis]
        if dim != group.base * link.scale:
            raise Unprunable(f"{value.name!r} has {dim!r} elements on axis {link.axis}, not {group.base * link.scale}")
        member = Member(value, link.axis, link.scale)
        group.members[value] = member
        return member

    def _add_producer(self, group: ChannelGroup, node: ir.Node, member: Member) -> None:
        if self.excluded(node):
            raise Unprunable(f"producer {node.op_type} {node.name!r} is excluded by the config")
        group.producers.append((node, member))
        group.slices.extend(_producer_slices(node, member))

    def _expand(self, group: ChannelGroup, node: ir.Node, member: Member) -> list[Link]:
        """Links to the other tensors of ``node`` that carry the channels (pass-through ops)."""
        links, slices, rewrite = rules.follow(node, member, group.base)
        for cut in slices:
            dims = rules.shape_of(cut.node.inputs[cut.index])  # type: ignore[arg-type]
            if dims[cut.axis] != group.base * cut.scale:
                raise Unprunable(
                    f"constant input {cut.index} of {node.op_type} {node.name!r} does not fit the channels"
                )
        group.slices.extend(slices)
        if rewrite:
            group.rewrites.append(node)
        return links
