"""Shape arithmetic evaluated on symbolic dimensions: what is static becomes a constant.

Exporters compute reshape targets at run time: ``Shape(x)`` then ``Gather``/``Slice``/
``Concat``/``Unsqueeze`` (torch's dynamo export of attention, tf2onnx's flatten). Where the
dimensions read are static, the result is a constant; where one is symbolic, a ``Reshape``
target can still be a constant (``-1`` for one unknown dimension, ``0`` for a dimension
copied from the same position of the input). onnxscript's folder follows only part of this
(1-D ``Gather`` of a whole ``Shape``, ``Concat``), so chains with a scalar index or a
``Slice`` stayed in the graph where onnxsim and onnxslim removed them.

A dimension is an ``int`` or a token: a named symbolic dimension (ONNX shape inference gives
equal names to dimensions it knows are equal) or an anonymous one, equal only to itself.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from graphopt.passes import edit

Dim = int | tuple[str, object]
# Vectors longer than this are not shapes; they are left to the constant folder.
_MAX_RANK = 16
_INTEGER = (ir.DataType.INT64, ir.DataType.INT32)


class _Known:
    """A shape-like integer value: its elements, and whether it is a scalar."""

    __slots__ = ("dims", "scalar")

    def __init__(self, dims: list[Dim], scalar: bool = False) -> None:
        self.dims, self.scalar = dims, scalar

    def static(self) -> bool:
        return all(isinstance(d, int) for d in self.dims)


def _dim(value: ir.Value, axis: int) -> Dim:
    dim = value.shape[axis] if value.shape is not None else None
    if isinstance(dim, int):
        return dim
    if isinstance(dim, ir.SymbolicDim) and dim.value:
        return ("sym", dim.value)
    return ("anon", (id(value), axis))


class ShapeValuesPass(ir.passes.InPlacePass):
    """Replace statically known shape arithmetic by constants; materialize Reshape targets."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for graph in itertools.chain([model.graph], _subgraphs(model.graph)):
            modified |= self._graph(graph)
        return ir.passes.PassResult(model, modified=modified)

    def _graph(self, graph: ir.Graph) -> bool:
        known: dict[ir.Value, _Known] = {}
        replace: list[tuple[ir.Node, ir.Value, _Known]] = []
        reshapes: list[ir.Node] = []
        for node in graph:
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "Reshape":
                reshapes.append(node)
            result = _evaluate(node, lambda v: _lookup(v, known))
            if result is None or len(node.outputs) != 1:
                continue
            out = node.outputs[0]
            known[out] = result
            if result.static() and node.op_type != "Constant" and not out.is_graph_output():
                replace.append((node, out, result))
        for node, out, result in replace:
            dtype = out.dtype.numpy() if out.dtype is not None else np.int64  # Shape's output is int64
            array = np.array(result.dims[0] if result.scalar else result.dims, dtype=dtype)
            _replace_with_constant(graph, node, out, array)
        materialized = sum(_materialize_reshape(node, known) for node in reshapes)
        return bool(replace) or materialized > 0


def _subgraphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    for node in ir.traversal.RecursiveGraphIterator(graph):
        yield from edit.bodies(node)


def _lookup(value: ir.Value | None, known: dict[ir.Value, _Known]) -> _Known | None:
    if value is None:
        return None
    if value in known:
        return known[value]
    tensor = value.const_value
    if tensor is None or tensor.dtype not in _INTEGER or tensor.size > _MAX_RANK:
        return None
    array = tensor.numpy()
    if array.ndim > 1:
        return None
    return _Known([int(v) for v in array.reshape(-1)], scalar=array.ndim == 0)


def _ints(value: ir.Value | None, lookup) -> list[int] | None:  # type: ignore[no-untyped-def]
    found = lookup(value)
    return [int(d) for d in found.dims] if found is not None and found.static() else None


def _evaluate(node: ir.Node, lookup) -> _Known | None:  # type: ignore[no-untyped-def]
    """The node's output as a shape-like value, when its inputs are known."""
    op, inputs = node.op_type, node.inputs
    if op == "Shape":
        x = inputs[0]
        if x is None or x.shape is None:
            return None
        rank = len(x.shape)
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", rank)
        return _Known([_dim(x, axis) for axis in range(rank)][slice(start, end)])
    if node.outputs[0].dtype not in _INTEGER:
        return None
    if op in ("Identity", "Cast"):
        return lookup(inputs[0])
    if op == "Gather":
        data, indices = lookup(inputs[0]), _ints(inputs[1], lookup)
        index = lookup(inputs[1])
        if data is None or data.scalar or indices is None or node.attributes.get_int("axis", 0) != 0:
            return None
        size = len(data.dims)
        if any(not -size <= i < size for i in indices):
            return None
        return _Known([data.dims[i] for i in indices], scalar=index.scalar)
    if op == "Slice":
        return _slice(node, lookup)
    if op == "Concat":
        parts = [lookup(v) for v in inputs]
        if any(p is None or p.scalar for p in parts):
            return None
        return _Known([d for p in parts for d in p.dims])  # type: ignore[union-attr]
    if op == "Unsqueeze":
        data = lookup(inputs[0])
        axes = node.attributes.get_ints("axes", None)
        axes = list(axes) if axes is not None else (_ints(inputs[1], lookup) if len(inputs) > 1 else None)
        return _Known(list(data.dims)) if data is not None and data.scalar and axes in ([0], [-1]) else None
    if op in _ARITHMETIC:
        return _arithmetic(node, lookup)
    if op == "Squeeze":
        data = lookup(inputs[0])
        return (
            _Known(list(data.dims), scalar=True)
            if data is not None and len(data.dims) == 1 and not data.scalar
            else None
        )
    return None


_ARITHMETIC = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}


def _arithmetic(node: ir.Node, lookup) -> _Known | None:  # type: ignore[no-untyped-def]
    """Element-wise integer arithmetic; a symbolic operand gives a new anonymous dimension."""
    left, right = lookup(node.inputs[0]), lookup(node.inputs[1])
    if left is None or right is None:
        return None
    if len(left.dims) != len(right.dims) and 1 not in (len(left.dims), len(right.dims)):
        return None
    size = max(len(left.dims), len(right.dims))
    dims: list[Dim] = []
    for i in range(size):
        a, b = left.dims[i % len(left.dims)], right.dims[i % len(right.dims)]
        if isinstance(a, int) and isinstance(b, int):
            dims.append(int(_ARITHMETIC[node.op_type](a, b)))
        else:
            dims.append(("anon", (id(node), i)))
    return _Known(dims, scalar=left.scalar and right.scalar)


def _slice(node: ir.Node, lookup) -> _Known | None:  # type: ignore[no-untyped-def]
    inputs = list(node.inputs) + [None] * (5 - len(node.inputs))
    data = lookup(inputs[0])
    starts, ends = _ints(inputs[1], lookup), _ints(inputs[2], lookup)
    axes = _ints(inputs[3], lookup) if inputs[3] is not None else [0]
    steps = _ints(inputs[4], lookup) if inputs[4] is not None else [1]
    if data is None or data.scalar or starts is None or ends is None or axes is None or steps is None:
        return None
    if len(starts) != 1 or len(ends) != 1 or axes not in ([0], [-1]) or steps[0] < 1:
        return None
    # Positive steps: Python's slice clamps starts and ends as ONNX does.
    return _Known(data.dims[slice(starts[0], ends[0], steps[0])])


def _constant(graph: ir.Graph, before: ir.Node, name: str, array: np.ndarray) -> ir.Value:
    """A Constant node holding ``array``, inserted before ``before``."""
    constant = ir.node("Constant", inputs=[], attributes={"value": ir.tensor(array)}, name=name)
    value = constant.outputs[0]
    value.name, value.dtype, value.shape = name, ir.DataType.from_numpy(array.dtype), ir.Shape(array.shape)
    value.const_value = ir.tensor(array)
    graph.insert_before(before, constant)
    return value


def _replace_with_constant(graph: ir.Graph, node: ir.Node, out: ir.Value, array: np.ndarray) -> None:
    ir.convenience.replace_all_uses_with(out, _constant(graph, node, f"{out.name}_static", array))


def _target_for(target: _Known, data: ir.Value, copy: bool) -> list[int] | None:
    """``target`` as constants for reshaping ``data``: 0 copies a dim at the same position, one -1."""
    dims: list[int] = []
    unknown = 0
    for axis, dim in enumerate(target.dims):
        if isinstance(dim, int):
            unknown += dim == -1
            dims.append(dim)
        elif copy and data.shape is not None and axis < len(data.shape) and _dim(data, axis) == dim:
            dims.append(0)
        else:
            unknown += 1
            dims.append(-1)
    return dims if unknown <= 1 else None


def _keeps_shape(dims: list[int], data: ir.Value) -> bool:
    """Whether reshaping ``data`` to the constant ``dims`` (0 copying) gives ``data``'s own shape."""
    if data.shape is None or len(dims) != len(data.shape):
        return False
    return all(d in (0, -1) or d == data.shape[axis] for axis, d in enumerate(dims))


def _materialize_reshape(node: ir.Node, known: dict[ir.Value, _Known]) -> int:
    """A Reshape whose target is known on symbolic dims: a constant target, a skipped inner Reshape, or Identity.

    ``Reshape(Reshape(x, a), b)`` is ``Reshape(x, b)`` when ``b`` does not copy from the inner result
    (element order is all a Reshape keeps); a target that gives the input's own shape makes an Identity.
    """
    if len(node.inputs) < 2 or node.inputs[1] is None or node.inputs[0] is None:
        return 0
    target = known.get(node.inputs[1]) or _lookup(node.inputs[1], {})
    if target is None or target.scalar:
        return 0
    copy = node.attributes.get_int("allowzero", 0) == 0
    data = node.inputs[0]
    inner = data.producer()
    rewired = False
    if (
        copy
        and inner is not None
        and inner.op_type == "Reshape"
        and inner.domain in ("", "ai.onnx")
        and inner.inputs[0] is not None
        and 0 not in target.dims
        and _target_for(target, inner.inputs[0], copy) is not None
    ):  # every symbolic dim is read from x itself: the inner Reshape is not needed
        data = inner.inputs[0]
        node.replace_input_with(0, data)
        rewired = True
    dims = _target_for(target, data, copy)
    if dims is None:
        return int(rewired)
    if (copy or 0 not in dims) and _keeps_shape(dims, data) and not node.outputs[0].is_graph_output():
        ir.convenience.replace_all_uses_with(node.outputs[0], data)
        return 1
    if node.inputs[1].const_value is not None:
        return int(rewired)
    assert node.graph is not None
    node.replace_input_with(1, _constant(node.graph, node, f"{node.name}_target", np.array(dims, dtype=np.int64)))
    return 1
