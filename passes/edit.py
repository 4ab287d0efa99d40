"""Graph edits every pass family shares: fresh names, initializers, node replacement, readers, types.

No pass logic lives here: what a helper does is the same whatever pass calls it.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graphopt.passes.loops import LoopInvariantsPass

# Ops whose outputs may be sequences or optionals: ONNX's inference has typed those as tensors.
NON_TENSOR_PRODUCERS = frozenset(
    {"SequenceEmpty", "SequenceConstruct", "SequenceInsert", "SequenceErase", "SplitToSequence", "Optional",
     "OptionalGetElement", "Loop", "If", "Scan", "SequenceMap"}
)  # fmt: skip


def all_nodes(model: ir.Model) -> list[ir.Node]:
    """Every node of the model: the main graph, its If/Loop/Scan bodies and its local functions."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for function in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(function))
    return nodes


def infer_types(model: ir.Model) -> None:
    """Fill in missing tensor types and shapes of main-graph values (exporters do not always write value_info).

    Inference runs on a copy and only missing main-graph tensor types are copied back:
    ONNX's inference can also rewrite subgraph types in ways ORT then rejects.
    """
    missing = {
        out.name: out
        for node in model.graph
        if node.op_type not in NON_TENSOR_PRODUCERS
        for out in node.outputs
        if (out.dtype is None or out.shape is None) and out.name
    }
    if not missing:
        return
    clone = model.clone()
    common_passes.ShapeInferencePass(strict_mode=False)(clone)
    for node in clone.graph:
        for out in node.outputs:
            target = missing.get(out.name)
            if target is not None and isinstance(out.type, ir.TensorType):
                if target.type is None:
                    target.type = out.type
                if target.shape is None and out.shape is not None:
                    target.shape = out.shape


def bodies(node: ir.Node) -> list[ir.Graph]:
    """The graphs a node holds in its attributes (If branches, a Loop or Scan body)."""
    found: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            found.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            found.extend(attr.value)
    return found


def unique_name(graph: ir.Graph, base: str, taken: set[str]) -> str:
    """``base`` or ``base_N``, unused by any value of the graph (its bodies included) or by ``taken``."""
    if not taken:
        taken.update(graph.initializers)
        taken.update(v.name for v in graph.inputs if v.name)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            taken.update(out.name for out in node.outputs if out.name)
            for body in bodies(node):
                taken.update(body.initializers)
                taken.update(v.name for v in body.inputs if v.name)
    name, index = base, 1
    while name in taken:
        name, index = f"{base}_{index}", index + 1
    taken.add(name)
    return name


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    tensor = ir.tensor(array, dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def drop_if_unused(graph: ir.Graph, value: ir.Value) -> None:
    """Remove an initializer nobody reads any more (and that is not a graph input/output)."""
    if (
        value.name in graph.initializers
        and not value.uses()
        and not value.is_graph_output()
        and value not in graph.inputs
    ):
        del graph.initializers[value.name]


def replace_node(graph: ir.Graph, node: ir.Node, new_nodes: list[ir.Node], result: ir.Value) -> None:
    """Put ``new_nodes`` in place of ``node``; ``result`` takes over its output's readers and name."""
    out = node.outputs[0]
    graph.insert_after(node, new_nodes)
    name = out.name
    out.replace_all_uses_with(result, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    out.name, result.name = f"{name}_replaced", name


def single_reader(value: ir.Value) -> ir.Node | None:
    """The only node reading ``value``, or None when it has several readers or is a graph output."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None
    return uses[0].node


def trans_b(node: ir.Node) -> bool:
    """Whether ``node`` is a Gemm reading its weight transposed (``[N, K]``)."""
    return node.op_type == "Gemm" and node.attributes.get_int("transB", 0) == 1


def excluded(node: ir.Node, patterns: Sequence[str], op_types: Sequence[str] = ()) -> bool:
    """Whether a lossy pass leaves ``node`` alone (every lossy pass's ``exclude`` option).

    Its op type is listed, or its name or its weight's name matches one of the shell ``patterns``
    (a plain name matches itself).
    """
    weight = weight_input(node)
    names = [n for n in (node.name, weight.name if weight is not None else None) if n]
    return node.op_type in op_types or any(fnmatch.fnmatchcase(n, p) for n in names for p in patterns)


def weight_input(node: ir.Node) -> ir.Value | None:
    """The input a lossy pass compresses: a Gather's table (input 0), else input 1 (Conv, MatMul, Gemm)."""
    index = 0 if node.op_type == "Gather" else 1
    return node.inputs[index] if len(node.inputs) > index else None


def unmatched_patterns(model: ir.Model, patterns: Sequence[str]) -> list[str]:
    """The ``exclude`` patterns that match no node name and no weight name (subgraphs included): a typo."""
    names: set[str] = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        weight = weight_input(node)
        names.update(n for n in (node.name, weight.name if weight is not None else None) if n)
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def finite(value: ir.Value | None) -> bool:
    """False only for a constant float tensor holding an infinity or a NaN (a padding row of -inf in an
    attention-bias table): a weight's scale would be infinite and every value read through it NaN, so the lossy
    passes leave such a tensor in float."""
    array = value.const_value if value is not None else None
    if array is None or array.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE):
        return True
    return bool(np.isfinite(array.numpy()).all())


def lift_constant_weights(model: ir.Model, min_elements: int = 16) -> int:
    """Turn Constant nodes holding tensors of ``min_elements`` or more into initializers, and let readers of an
    initializer's Identity copy read it (both exact).

    Paddle and older exporters store every weight as a Constant node; to the lossy passes,
    which look for constant initializers, such a model has no weights. paddle2onnx also
    carries a Loop body's weights through the loop unchanged: they become outer-scope reads
    (:mod:`graphopt.passes.loops`). Returns how many Constants were lifted and copies bypassed (subgraphs included).
    """
    before = sum(1 for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.op_type == "Constant")
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=min_elements)(model)
    LoopInvariantsPass()(model)
    after = sum(1 for node in ir.traversal.RecursiveGraphIterator(model.graph) if node.op_type == "Constant")
    return before - after + _bypass_weight_copies(model)


def _bypass_weight_copies(model: ir.Model) -> int:
    """Let readers of ``Identity(initializer)`` read the initializer (exact): exporters that reuse a layer write its
    weights once and an Identity per reuse, and a lossy pass that looks for constant weights would leave every such
    layer in float, or quantize a copy and keep the float original for the Identity. Returns how many were bypassed."""
    bypassed = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        source, out = node.inputs[0], node.outputs[0]
        if source is None or not source.is_initializer() or source.const_value is None or out.is_graph_output():
            continue
        if source.is_graph_input():  # an overridable default: the caller may feed another value
            continue
        ir.convenience.replace_all_uses_with(out, source)
        node.graph.remove(node, safe=True)  # type: ignore[union-attr]
        bypassed += 1
    return bypassed


@contextlib.contextmanager
def overridable_inputs_hidden(model: ir.Model) -> Iterator[int]:
    """While the block runs, a graph input that also has an initializer is a plain input.

    Such an initializer is only a default (IR >= 4): a caller may feed another value. A pass
    that saw its value would fold, quantize or prune it into the graph, and the output would
    ignore what the caller feeds. Yields how many were hidden; their defaults are put back after.
    """
    hidden = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers and value.const_value is not None:
            hidden.append((value, value.const_value))
            model.graph.initializers.pop(value.name)
            value.const_value = None
    try:
        yield len(hidden)
    finally:
        for value, tensor in hidden:
            value.const_value = tensor
            model.graph.register_initializer(value)


def guard_subgraph_outputs(model: ir.Model) -> int:
    """Put an Identity between every If/Loop/Scan body output and the value it names from outside the body.

    ONNX Runtime refuses a subgraph output that is an outer-scope value (or an initializer
    lifted out of the body) returned directly; passes that fold or lift values can leave one.
    Returns the number of Identity nodes added.
    """
    added = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for body in bodies(node):
            added += _guard_outputs(body)
    return added


def _guard_outputs(body: ir.Graph) -> int:
    added = 0
    for index, value in enumerate(body.outputs):
        producer = value.producer()
        inner = (producer is not None and producer.graph is body) or value in body.inputs
        if inner:
            continue
        identity = ir.node("Identity", [value], name=f"{value.name}_guard")
        out = identity.outputs[0]
        out.name, out.type, out.shape = f"{value.name}_out", value.type, value.shape
        body.append(identity)
        body.outputs[index] = out
        added += 1
    return added
