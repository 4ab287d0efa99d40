"""Loop-carried values that never change become outer-scope reads.

paddle2onnx passes a decoder's weights into its ``Loop`` as loop-carried state that the body
returns unchanged: ten weight matrices of a table-structure decoder were body inputs, so no
pass saw them as weights, and every iteration copied them. A carried value whose body output
is its body input is its initial value at every iteration and after the loop (ONNX Loop
semantics, zero iterations included), so the body can read the outer value directly and the
state is dropped from the Loop.
"""

from __future__ import annotations

import onnx_ir as ir

_DEFAULT_DOMAINS = ("", "ai.onnx")


def _invariant(body: ir.Graph, k: int) -> bool:
    """Whether carried value ``k`` leaves the body as it came in (directly or through an Identity)."""
    value_in, value_out = body.inputs[2 + k], body.outputs[1 + k]
    producer = value_out.producer()
    if producer is not None and producer.op_type == "Identity" and producer.domain in _DEFAULT_DOMAINS:
        value_out = producer.inputs[0]
    if value_out is not value_in:
        return False
    # The body input must not leave the body anywhere else: an outer value cannot be a body output.
    return sum(1 for out in body.outputs if out is value_in or _identity_of(out) is value_in) == 1


def _identity_of(value: ir.Value) -> ir.Value | None:
    producer = value.producer()
    if producer is not None and producer.op_type == "Identity" and producer.domain in _DEFAULT_DOMAINS:
        return producer.inputs[0]
    return None


def _drop_carried(loop: ir.Node, body: ir.Graph, k: int) -> ir.Node:
    """A copy of ``loop`` without carried value ``k``; every read of it reads the initial value."""
    initial = loop.inputs[2 + k]
    assert initial is not None
    out = body.outputs.pop(1 + k)
    identity = out.producer() if out is not body.inputs[2 + k] else None
    value_in = body.inputs.pop(2 + k)
    ir.convenience.replace_all_uses_with(value_in, initial)
    if identity is not None and not identity.outputs[0].uses():
        body.remove(identity, safe=True)
    # Readers of the final value read the initial one (replace_nodes_and_values would also rename it).
    ir.convenience.replace_all_uses_with(loop.outputs[k], initial)
    inputs = [v for i, v in enumerate(loop.inputs) if i != 2 + k]
    outputs = [v for i, v in enumerate(loop.outputs) if i != k]
    replacement = ir.Node(
        loop.domain,
        loop.op_type,
        inputs,
        attributes=list(loop.attributes.values()),
        num_outputs=len(outputs),
        name=loop.name,
        version=loop.version,
    )
    for old, new in zip(outputs, replacement.outputs, strict=True):
        new.name, new.type, new.shape = old.name, old.type, old.shape
    ir.convenience.replace_nodes_and_values(loop.graph, loop, [loop], [replacement], outputs, list(replacement.outputs))
    return replacement


class LoopInvariantsPass(ir.passes.InPlacePass):
    """Drop Loop-carried values the body returns unchanged; the body reads the outer value."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        dropped = 0
        for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
            if node.op_type != "Loop" or node.domain not in _DEFAULT_DOMAINS or "body" not in node.attributes:
                continue
            body = node.attributes["body"].as_graph()
            k = 0
            while k < len(node.inputs) - 2:
                if node.inputs[2 + k] is None or node.outputs[k].is_graph_output() or not _invariant(body, k):
                    k += 1
                    continue
                node = _drop_carried(node, body, k)
                dropped += 1
        return ir.passes.PassResult(model, modified=dropped > 0)
