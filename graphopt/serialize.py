"""Models as protobuf bytes for ONNX Runtime and onnx.checker: what :mod:`graphopt.runtime` needs of
serialization, apart from :mod:`graphopt.io`'s files (so neither imports the other in a loop).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import onnx
import onnx_ir as ir

# Bytes a COO sparse initializer spends on each non-zero's index: onnx.checker accepts
# only int64 indices.
SPARSE_INDEX_BYTES = 8


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize ``model`` (external tensors stay references to their files)."""
    return ir.serde.serialize_model(model)


def model_bytes(model: ir.Model) -> int:
    """Bytes of all initializers, whether in memory or in external files."""
    total = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def to_bytes(model: ir.Model, ir_version: int | None = None) -> bytes:
    """Serialize a model under 2 GiB with all tensor data inlined, for ONNX Runtime."""
    proto = to_proto(model)
    inline_external(proto, model)
    if ir_version is not None:
        proto.ir_version = ir_version
    return proto.SerializeToString()


def inline_external(proto: onnx.ModelProto, model: ir.Model) -> None:
    by_name = {}
    for graph in model.graphs():
        for name, value in graph.initializers.items():
            if isinstance(value.const_value, ir.ExternalTensor):
                by_name[name] = value.const_value
    if not by_name:
        return
    for tensor in iter_tensors(proto.graph):
        source = by_name.get(tensor.name)
        if source is not None and tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.ClearField("external_data")
            tensor.data_location = onnx.TensorProto.DEFAULT
            tensor.raw_data = source.tobytes()


def tiny_model_bytes(ir_version: int) -> bytes:
    """A one-node model at ``ir_version``, to probe what ONNX Runtime accepts."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
    proto.ir_version = ir_version
    return proto.SerializeToString()


def min_ir_version(model: ir.Model) -> int:
    """The lowest IR version the model's opset imports allow."""
    opsets = [onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()]
    known = [op for op in opsets if op.domain in ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.training")]
    return onnx.helper.find_min_ir_version_for(known, ignore_unknown=True) if known else 3


def check_model(model: ir.Model) -> None:
    """Run ``onnx.checker`` on a model in memory; raises ``onnx.checker.ValidationError``."""
    proto = to_proto(model)
    if proto.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        onnx.checker.check_model(proto)


# Protobuf cannot serialize a message over 2 GiB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def iter_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Yield every tensor of ``graph``: initializers, sparse initializers' values and indices, its
    nodes' attributes and its subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def iter_model_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Yield every tensor of the model: its graph's (see :func:`iter_tensors`) and its functions'."""
    yield from iter_tensors(proto.graph)
    for function in proto.functions:
        yield from _node_tensors(function.node)


def _node_tensors(nodes: Iterable[onnx.NodeProto]) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sparse in [*([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []), *attr.sparse_tensors]:
                yield from (sparse.values, sparse.indices)
            for sub in [*([attr.g] if attr.HasField("g") else []), *attr.graphs]:
                yield from iter_tensors(sub)
