"""Where a LoRA delta lands: the base ops that read a weight, and how to edit that weight.

Every base op is seen through its *effective* weight ``E``: for MatMul/Gemm (and the
com.microsoft quantized MatMuls) ``y = x @ E`` with ``E`` of shape [in, out]; for Conv ``E`` is
the kernel [out, in, *k]. A merge is ``E += delta`` on the output features the LoRA covers;
each weight access maps ``E`` to and from the layout the op stores (transposed for Gemm
with transB, scaled by Gemm's alpha, behind a Transpose, quantized).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx_ir as ir

from graphopt.passes import edit
from graphopt.passes.edit import single_reader

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
QUANTIZED_OPS = frozenset({"MatMulNBits", "MatMulBnb4"})


def is_default_domain(node: ir.Node) -> bool:
    """Whether ``node`` is a standard ONNX operator."""
    return node.domain in ("", "ai.onnx")


def attr(node: ir.Node, name: str, default: object = None) -> object:
    """An attribute's Python value, or ``default`` when the node does not set it."""
    value = node.attributes.get(name)
    return default if value is None else value.value


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind ``value``: an initializer, a Constant, or a Transpose of either."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    if tensor is not None:
        return tensor.numpy()
    node = value.producer()
    if node is not None and node.op_type == "Transpose" and is_default_domain(node):
        inner = const_array(node.inputs[0])
        if inner is not None:
            perm = attr(node, "perm")
            return np.transpose(inner, perm if perm is None else list(perm))
    return None


def is_wrapper(node: ir.Node, dtype: ir.DataType | None) -> bool:
    """Whether ``node`` passes its first input through unchanged at inference time.

    Identity, a Cast to the type it already has (``dtype`` stands in when the exporter
    left the input's type unknown), and a Dropout that is not in training mode.
    """
    if not is_default_domain(node) or not node.inputs or node.inputs[0] is None:
        return False
    if node.op_type == "Identity":
        return True
    if node.op_type == "Cast":
        source = node.inputs[0].dtype or dtype
        return source is not None and attr(node, "to") == source.value
    if node.op_type == "Dropout":
        training = node.inputs[2] if len(node.inputs) > 2 else None
        mask_unused = len(node.outputs) < 2 or not node.outputs[1].uses()
        if training is None:
            return mask_unused
        flag = const_array(training)
        return mask_unused and flag is not None and not flag.any()
    return False


def strip_wrappers(value: ir.Value, dtype: ir.DataType | None) -> ir.Value:
    """The value behind any chain of pass-through nodes (see :func:`is_wrapper`)."""
    seen = 0
    while (node := value.producer()) is not None and is_wrapper(node, dtype) and seen < 64:
        value = node.inputs[0]  # type: ignore[assignment]
        seen += 1
    return value


class WeightAccess(Protocol):
    """Adds a delta to one base op's effective weight, wherever and however it is stored."""

    def add(self, delta: np.ndarray, columns: tuple[int, int] | None) -> dict[str, float]:
        """Add ``delta`` to the effective weight (to ``columns`` of it); return error stats, if any."""
        ...

    def changed(self) -> list[str]:
        """Names of the initializers the access rewrote."""
        ...


class WeightOpener(Protocol):
    """Decides whether a target's weight may be edited, and opens it for writing."""

    def problem(self, target: Target) -> str | None: ...

    def open(self, target: Target) -> WeightAccess | str: ...


@dataclass
class Target:
    """A base op whose weight can absorb a LoRA delta.

    Attributes:
        kind: matmul, gemm, conv, their ``_dq`` variants (weight behind DequantizeLinear),
            matmulnbits or matmulbnb4.
        node: The base op.
        x: Its activation input.
        in_features: Rows of the effective weight (Conv: input channels).
        out_features: Output features the op computes.
        columns: The output features a LoRA on this value covers, when the op's output
            is split (a fused QKV projection); None for all of them.
        output: The op output (before any bias Add) a kept float branch adds to.
    """

    kind: str
    node: ir.Node
    x: ir.Value
    in_features: int
    out_features: int
    columns: tuple[int, int] | None = None
    output: ir.Value | None = None

    @property
    def quantized(self) -> bool:
        return self.kind.endswith("_dq") or self.kind in ("matmulnbits", "matmulbnb4")

    @property
    def weight(self) -> ir.Value:
        return self.node.inputs[1]  # type: ignore[return-value]

    @property
    def dtype(self) -> ir.DataType:
        if self.kind in ("matmulnbits", "matmulbnb4"):
            return self.node.inputs[2].dtype or ir.DataType.FLOAT  # type: ignore[union-attr]
        return self.x.dtype or self.weight.dtype or ir.DataType.FLOAT

    def describe(self) -> str:
        return f"{self.node.op_type} {self.node.name or '(unnamed)'} reading {self.weight.name}"


def target_of_node(node: ir.Node) -> Target | str:
    """The node as a :class:`Target`, or why it cannot absorb a delta."""
    if node.domain == MS_DOMAIN and node.op_type in QUANTIZED_OPS:
        k, n = int(attr(node, "K", 0)), int(attr(node, "N", 0))  # type: ignore[call-overload]
        return Target(node.op_type.lower(), node, node.inputs[0], k, n, output=node.outputs[0])  # type: ignore[arg-type]
    if not is_default_domain(node) or node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.inputs) < 2:
        return f"{node.op_type} is not a MatMul, Gemm, Conv, MatMulNBits or MatMulBnb4"
    x, weight = node.inputs[0], node.inputs[1]
    if x is None or weight is None:
        return f"{node.op_type} {node.name} has a missing input"
    dequant = weight.producer()
    suffix = "_dq" if dequant is not None and dequant.op_type == "DequantizeLinear" else ""
    shape = constant_shape(dequant.inputs[0] if suffix and dequant is not None else weight)
    if shape is None:
        return f"weight {weight.name} of {node.op_type} {node.name} is not a constant"
    kind = node.op_type.lower() + suffix
    if node.op_type == "MatMul":
        if len(shape) != 2:
            return f"weight {weight.name} of MatMul {node.name} has rank {len(shape)}, not 2"
        return Target(kind, node, x, shape[0], shape[1], output=node.outputs[0])
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return f"Gemm {node.name} has transA=1"
        trans_b = bool(attr(node, "transB", 0))
        rows, cols = (shape[1], shape[0]) if trans_b else (shape[0], shape[1])
        return Target(kind, node, x, rows, cols, output=node.outputs[0])
    if attr(node, "group", 1) != 1 or len(shape) < 3:
        return f"Conv {node.name} is grouped or has no spatial kernel"
    return Target(kind, node, x, shape[1], shape[0], output=node.outputs[0])


def constant_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of a constant, without reading its data when it is an initializer."""
    if value is not None and value.const_value is not None:
        return tuple(value.const_value.shape.numpy())
    array = const_array(value)
    return None if array is None else tuple(array.shape)


def find_target(value: ir.Value) -> Target | str:
    """The base op computing ``value``, through a bias Add and a Split/Slice of a fused output."""
    columns = None
    value = _skip_wrappers(value)
    node = value.producer()
    if node is not None and is_default_domain(node) and node.op_type in ("Split", "Slice"):
        columns = _split_columns(node, value)
        if isinstance(columns, str):
            return columns
        value = node.inputs[0]  # type: ignore[assignment]
        if single_reader(value) is None:
            return f"the fused output {value.name} is read by more than its {node.op_type}"
        node = value.producer()
    if node is not None and is_default_domain(node) and node.op_type == "Add":
        consts = [i for i, v in enumerate(node.inputs) if const_array(v) is not None]
        if len(consts) != 1:
            return f"Add {node.name} is neither a bias Add nor a base op"
        value = node.inputs[1 - consts[0]]  # type: ignore[assignment]
        if single_reader(value) is None:
            return f"the base output {value.name} has other readers besides its bias Add"
        value = _skip_wrappers(value)
        node = value.producer()
    if node is None:
        return f"{value.name} is not computed by a node"
    target = target_of_node(node)
    if isinstance(target, str):
        return target
    if columns is not None:
        if target.kind.startswith("conv"):
            return "a Split of a Conv output is not supported"
        if columns[1] > target.out_features:
            return f"the split range {columns} passes the {target.out_features} outputs of {node.name}"
        target.columns = columns
    return target


def _skip_wrappers(value: ir.Value) -> ir.Value:
    """Step back over pass-through nodes that only this chain reads."""
    while (node := value.producer()) is not None and is_wrapper(node, value.dtype):
        if single_reader(node.inputs[0]) is not node:  # type: ignore[arg-type]
            break
        value = node.inputs[0]  # type: ignore[assignment]
    return value


def _split_columns(node: ir.Node, value: ir.Value) -> tuple[int, int] | str:
    """The range of last-axis features ``value`` takes from its Split or Slice."""
    rank = node.inputs[0].shape.rank() if node.inputs[0] is not None and node.inputs[0].shape else None
    if node.op_type == "Slice":
        parts = [const_array(v) for v in node.inputs[1:5]] + [None] * (5 - len(node.inputs))
        starts, ends, axes, steps = parts[:4]
        if starts is None or ends is None or starts.size != 1:
            return f"Slice {node.name} does not take one constant range"
        axis = int(axes.reshape(-1)[0]) if axes is not None else 0
        if not _is_last_axis(axis, rank) or (steps is not None and int(steps.reshape(-1)[0]) != 1):
            return f"Slice {node.name} is not a unit-step slice of the last axis"
        return int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0])
    axis = int(attr(node, "axis", 0))  # type: ignore[call-overload]
    if not _is_last_axis(axis, rank):
        return f"Split {node.name} does not split the last axis"
    sizes = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if sizes is None and attr(node, "split") is not None:
        sizes = np.asarray(attr(node, "split"))
    if sizes is None:
        return f"Split {node.name} has no constant split sizes"
    index = list(node.outputs).index(value)
    start = int(np.sum(sizes[:index]))
    return start, start + int(sizes[index])


def _is_last_axis(axis: int, rank: int | None) -> bool:
    return axis == -1 or (rank is not None and axis == rank - 1)


def add_in_layout(
    stored: np.ndarray, target: Target, delta: np.ndarray, columns: tuple[int, int] | None, *, transposed: bool = False
) -> np.ndarray:
    """``stored`` (the weight as the base op reads it) plus ``delta`` (effective layout), same dtype.

    MatMul reads [in, out]; Gemm reads alpha·B with B [out, in] under transB; a Transpose
    in front of the op flips the stored array once more; a Conv kernel is its own layout.
    """
    node = target.node
    if target.kind.startswith("conv"):
        update, out_axis = delta, 0
    else:
        flip, alpha = transposed, 1.0
        if target.kind.startswith("gemm"):
            flip ^= bool(attr(node, "transB", 0))
            alpha = float(attr(node, "alpha", 1.0))  # type: ignore[arg-type]
        update, out_axis = (delta.T if flip else delta) / alpha, 0 if flip else 1
    merged = np.array(stored, copy=True)
    index = [slice(None)] * merged.ndim
    if columns is not None:
        index[out_axis] = slice(*columns)
    merged[tuple(index)] += update.astype(merged.dtype)
    return merged


@dataclass
class FloatWeight:
    """A float weight stored in an initializer, maybe behind a Transpose."""

    target: Target
    init: ir.Value
    transposed: bool

    def add(self, delta: np.ndarray, columns: tuple[int, int] | None) -> dict[str, float]:
        # In the stored dtype: one copy of the weight, not a float64 round trip.
        stored = self.init.const_value.numpy()  # type: ignore[union-attr]
        merged = add_in_layout(stored, self.target, delta, columns, transposed=self.transposed)
        self.init.const_value = ir.tensor(merged, name=self.init.name)
        return {}

    def changed(self) -> list[str]:
        return [self.init.name or ""]


def locate_weight(target: Target) -> tuple[ir.Value, bool, bool] | str:
    """(initializer, behind a Transpose, read by this op alone) for a float target's weight."""
    weight = target.weight
    producer = weight.producer()
    transposed = (
        producer is not None
        and producer.op_type == "Transpose"
        and is_default_domain(producer)
        and producer.inputs[0] is not None
        and len(producer.inputs[0].shape or ()) == 2
        and list(attr(producer, "perm", [1, 0])) == [1, 0]  # type: ignore[call-overload]
    )
    init = producer.inputs[0] if transposed and producer is not None else weight
    if init is None or not init.is_initializer() or init.is_graph_input() or init.const_value is None:
        return f"weight {weight.name} is not a constant initializer"
    sole = single_reader(weight) is target.node and (not transposed or single_reader(init) is producer)
    return init, transposed, sole


def float_weight(target: Target, *, copy_shared: bool) -> FloatWeight | str:
    """Write access to a float target's weight, or why it must not be edited.

    A weight read by any other node is never changed: with ``copy_shared`` the base op gets
    its own copy (in the layout it reads), otherwise the caller leaves the branch alone.
    """
    located = locate_weight(target)
    if isinstance(located, str):
        return located
    init, transposed, sole = located
    if sole:
        return FloatWeight(target, init, transposed)
    if not copy_shared:
        return f"weight {init.name} is also read by other nodes (shared_weights='copy' gives this op its own copy)"
    graph = target.node.graph
    assert graph is not None
    array = np.ascontiguousarray(const_array(target.weight))
    copy = edit.add_initializer(graph, unique_name(graph, f"{init.name}.merged"), array)
    target.node.replace_input_with(1, copy)
    logger.debug("merge_lora: %s shares %s; gave it a copy %s", target.describe(), init.name, copy.name)
    return FloatWeight(target, copy, False)


def unique_name(graph: ir.Graph, base: str) -> str:
    """``base``, or ``base_1``, ``base_2``... whichever no value of ``graph`` uses."""
    return edit.unique_name(graph, base, set())


def add_delta(access: WeightAccess, target: Target, delta: np.ndarray, sign: float) -> dict[str, float]:
    """Add ``sign * delta`` to the target's effective weight (to its columns, for a split output)."""
    return access.add(sign * delta, target.columns)


def remove_dead(graph: ir.Graph, seeds: Iterable[ir.Node]) -> int:
    """Remove ``seeds`` and then any producer left without readers; drop orphaned initializers.

    Only nodes reachable backwards from the seeds are considered, so dead code the model
    had before the pass stays where it was.
    """
    pending = list(seeds)
    removed = 0
    orphans: list[ir.Value] = []
    while pending:
        node = pending.pop()
        if node.graph is None or any(o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        node.graph.remove(node, safe=True)
        removed += 1
        orphans.extend(inputs)
        pending.extend(p for v in inputs if (p := v.producer()) is not None)
    for value in orphans:
        owner = value.graph or graph
        name = value.name or ""
        if value.is_initializer() and not value.uses() and not value.is_graph_output() and name in owner.initializers:
            owner.initializers.pop(name)
    return removed
