"""Static statistics of a model: nodes, ops, parameters, bytes, sparsity, Q/DQ pairs.

Used by the pipeline (before/after each pass), by ``graphopt inspect`` and the report.
Reading weight values for sparsity touches every initializer, so it is optional.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.passes.edit import all_nodes


@dataclass
class ModelStats:
    """Counts that describe a model's size and make-up."""

    nodes: int = 0
    parameters: int = 0
    bytes: int = 0
    ops: dict[str, int] = field(default_factory=dict)
    bytes_by_dtype: dict[str, int] = field(default_factory=dict)
    params_by_dtype: dict[str, int] = field(default_factory=dict)
    qdq_pairs: int = 0
    sparsity: float | None = None
    external_bytes: int = 0
    functions: int = 0
    subgraphs: int = 0
    opsets: dict[str, int] = field(default_factory=dict)
    ir_version: int = 0

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def model_stats(model: ir.Model, *, sparsity: bool = False) -> ModelStats:
    """Collect :class:`ModelStats`; ``sparsity=True`` also reads float weights to count zeros."""
    nodes = all_nodes(model)
    ops = Counter(f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in nodes)
    stats = ModelStats(
        nodes=len(nodes),
        ops=dict(ops.most_common()),
        functions=len(model.functions),
        subgraphs=sum(1 for _ in model.graphs()) - 1,
        opsets=dict(model.opset_imports),
        ir_version=model.ir_version,
    )
    stats.qdq_pairs = sum(
        1
        for n in nodes
        if n.op_type == "DequantizeLinear" and n.inputs[0] is not None and _producer_op(n.inputs[0]) == "QuantizeLinear"
    )
    zeros, counted = 0, 0
    for tensor in _tensors(model):
        dtype = tensor.dtype.name
        nbytes = _nbytes(tensor)
        stats.parameters += tensor.size
        stats.bytes += nbytes
        stats.bytes_by_dtype[dtype] = stats.bytes_by_dtype.get(dtype, 0) + nbytes
        stats.params_by_dtype[dtype] = stats.params_by_dtype.get(dtype, 0) + tensor.size
        if isinstance(tensor, ir.ExternalTensor):
            stats.external_bytes += tensor.nbytes
        if sparsity and tensor.dtype.is_floating_point() and tensor.size > 1:
            zeros += int(np.count_nonzero(tensor.numpy() == 0))
            counted += tensor.size
    if sparsity:
        stats.sparsity = zeros / counted if counted else 0.0
    return stats


def _nbytes(tensor: ir.TensorProtocol) -> int:
    """Bytes of a tensor; strings (label tables, vocabularies) have no fixed width, so count their bytes."""
    if tensor.dtype == ir.DataType.STRING:
        return sum(len(item) for item in tensor.numpy().ravel())
    return tensor.nbytes


def _producer_op(value: ir.Value) -> str | None:
    producer = value.producer()
    return producer.op_type if producer is not None else None


def _tensors(model: ir.Model) -> list[ir.TensorProtocol]:
    """Initializers of every graph, and tensors held by Constant nodes."""
    tensors = []
    for graph in model.graphs():
        tensors.extend(v.const_value for v in graph.initializers.values() if v.const_value is not None)
    for node in all_nodes(model):
        if node.op_type == "Constant" and node.domain == "":
            attr = node.attributes.get("value")
            if attr is not None and attr.type == ir.AttributeType.TENSOR:
                tensors.append(attr.as_tensor())
    return tensors
