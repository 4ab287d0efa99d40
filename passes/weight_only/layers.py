"""Which weights the ``weight_only`` pass quantizes: constant MatMul/Gemm matrices and embedding tables."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Literal

import onnx_ir as ir

from graphopt.passes import edit
from graphopt.passes.edit import excluded
from graphopt.passes.weight_only.config import FLOAT_FORMATS, WeightOnlyConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layer:
    """One constant weight to quantize and the node that reads it.

    ``k`` is the reduction length (the blocked axis) and ``n`` the other one; ``transposed``
    says the weight is stored ``[n, k]`` (Gemm with transB, embedding tables ``[V, D]``).
    """

    node: ir.Node
    weight: ir.Value
    kind: Literal["matmul", "gemm", "gather"]
    k: int
    n: int
    transposed: bool
    activation: ir.Value | None
    via: ir.Node | None = None  # a Transpose between the weight and an embedding Gather (a tied LM head's table)

    @property
    def dtype(self) -> ir.DataType:
        """The weight's element type (FLOAT or FLOAT16): the type its scales and outputs keep."""
        return self.weight.const_value.dtype  # type: ignore[union-attr]


def plan_layers(graph: ir.Graph, config: WeightOnlyConfig) -> tuple[list[Layer], dict[str, int]]:
    """Layers the pass will quantize, in the graph and its If/Loop/Scan bodies, and why others were skipped."""
    layers: list[Layer] = []
    skipped: Counter[str] = Counter()
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in config.op_types:
            continue
        if excluded(node, config.exclude, config.exclude_op_types):
            skipped["excluded by name"] += 1
            continue
        layer, reason = _match(node, config)
        if layer is not None and not edit.finite(layer.weight):
            layer, reason = None, "weight holds inf or NaN (a mask table)"
        if layer is not None:
            layers.append(layer)
        elif reason:
            logger.debug("weight_only: %s (%s) left in float: %s", node.name, node.op_type, reason)
            skipped[reason] += 1
    # A weight that some other op (or a subgraph, or the graph output) reads stays in float for it
    # anyway: quantizing its other readers would store it twice.
    readers: dict[str, set[int]] = {}
    for layer in layers:
        readers.setdefault(layer.weight.name, set()).add(id(layer.node))
        if layer.via is not None:  # the Transpose reads the weight for this Gather alone (checked in _match)
            readers[layer.weight.name].add(id(layer.via))
    kept = []
    for layer in layers:
        value = layer.weight
        if value.is_graph_output() or any(id(use.node) not in readers[value.name] for use in value.uses()):
            logger.debug("weight_only: %s left in float: %s is also read by other ops", layer.node.name, value.name)
            skipped["weight also read by other ops"] += 1
        else:
            kept.append(layer)
    return kept, dict(skipped)


FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})


def _constant_float_matrix(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.const_value is not None
        and value.const_value.dtype in FLOAT_TYPES
        and len(value.const_value.shape) == 2
    )


def _transposed_weight(table: ir.Value | None) -> ir.Node | None:
    """The Transpose that makes ``table`` from a constant float matrix (ORT GenAI's tied embeddings read the
    LM head's [D, V] weight through one), when that Gather is its only reader."""
    node = table.producer() if table is not None else None
    if node is None or node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
        return None
    if tuple(node.attributes.get_ints("perm", (1, 0))) != (1, 0) or not _constant_float_matrix(node.inputs[0]):
        return None
    uses = list(table.uses())  # type: ignore[union-attr]
    if table.is_graph_output() or len(uses) != 1:  # type: ignore[union-attr]
        return None
    return node


def _match(node: ir.Node, config: WeightOnlyConfig) -> tuple[Layer | None, str | None]:
    inputs = list(node.inputs)
    if node.op_type == "Gather":
        table = inputs[0] if inputs else None
        if node.attributes.get_int("axis", 0) != 0:
            return None, None  # not an embedding lookup
        tied = _transposed_weight(table) if config.tied else None
        if tied is not None:  # Gather(Transpose(W)): the table of a tied LM head, W [D, V]
            d, v = tied.inputs[0].const_value.shape  # type: ignore[union-attr]
            return Layer(node, tied.inputs[0], "gather", d, v, False, None, via=tied), None  # type: ignore[arg-type]
        if not _constant_float_matrix(table):
            return None, None  # not an embedding lookup
        v, d = table.const_value.shape  # type: ignore[union-attr]
        return Layer(node, table, "gather", d, v, True, None), None  # type: ignore[arg-type]
    weight = inputs[1] if len(inputs) > 1 else None
    activation = inputs[0] if inputs else None
    if not _constant_float_matrix(weight):
        return None, "weight is not a constant float32/float16 matrix"
    if activation is None or activation.const_value is not None or (activation.shape and len(activation.shape) < 2):
        return None, "input A is constant or not a matrix"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return None, "Gemm with transA"
    trans_b = edit.trans_b(node)
    rows, cols = weight.const_value.shape  # type: ignore[union-attr]
    k, n = (cols, rows) if trans_b else (rows, cols)
    if config.format in FLOAT_FORMATS and k % config.block_for(k):
        return None, f"K not a multiple of the {config.format} block size"
    kind = "gemm" if node.op_type == "Gemm" else "matmul"
    return Layer(node, weight, kind, k, n, trans_b, activation), None  # type: ignore[arg-type]
