"""Mixed precision: float32 -> float16 with range-sensitive ops kept in float32."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphopt.passes import edit
from graphopt.passes.edit import infer_types
from graphopt.passes.options import FP16_MAX, Fp16Config

logger = logging.getLogger(__name__)

_FLOAT_TYPES = (ir.DataType.FLOAT,)
# Ops converted: their output type follows their float inputs (type constraint T) and ORT
# has float16 kernels or casts around them itself. Anything else stays float32: ops with
# fixed float outputs (TfIdfVectorizer), statistics outputs, sequences, control flow.
FP16_OPS = frozenset(
    {"MatMul", "Gemm", "Conv", "ConvTranspose", "Add", "Sub", "Mul", "Div", "Relu", "LeakyRelu", "Sigmoid", "Tanh",
     "Erf", "Gelu", "Sqrt", "Neg", "Abs", "Clip", "Max", "Min", "Reshape", "Transpose", "Flatten", "Squeeze",
     "Unsqueeze", "Concat", "Split", "Slice", "Gather", "Expand", "Identity", "MaxPool", "AveragePool",
     "GlobalAveragePool", "BatchNormalization", "LayerNormalization", "Softplus", "HardSigmoid", "HardSwish", "Pad",
     "Tile", "Where", "Cast", "Constant", "Dropout", "InstanceNormalization", "PRelu", "Elu", "Selu", "Floor", "Ceil"}
)  # fmt: skip


class Float16Pass(ir.passes.InPlacePass):
    """Convert the main graph to float16, keeping range-sensitive ops and out-of-range values in float32.

    Each node is coloured float16 or float32; float32 weights read only by float16 nodes
    are stored as float16; a Cast is inserted (once per value and direction) wherever a
    value crosses between colours, and at the graph edges when ``keep_io_types``. Nodes
    whose calibrated inputs or outputs exceed ``max_abs`` stay float32, so activations
    that would overflow float16 never do. Graph input/output names are kept. Subgraphs
    and functions are left in float32; a body that reads a main-graph value turned float16
    reads a float32 copy.

    Attributes:
        config: The pass options.
        magnitudes: Calibrated max |x| per tensor (empty without calibration data).
    """

    def __init__(self, config: Fp16Config, magnitudes: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.config, self.magnitudes = config, dict(magnitudes or {})
        self.details: dict[str, object] = {}
        self._float_outputs: set[int] = set()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        infer_types(model)
        values = [*graph.initializers.values(), *graph.inputs, *(o for n in graph for o in n.outputs)]
        if any(v.dtype == ir.DataType.FLOAT16 for v in values):
            self.details = {"skipped": "already holds float16 values"}
            return ir.passes.PassResult(model, modified=False)
        self._float_outputs = {id(v) for v in graph.outputs if v.dtype == ir.DataType.FLOAT}
        half = {id(n) for n in graph if self._convertible(n)}
        # A Constant read only by float32 nodes stays float32: behind a Cast it would stop being a
        # constant to ONNX Runtime (an empty Resize `scales` then reads as given: SLANet).
        half -= {id(n) for n in graph if n.op_type == "Constant" and not _read_in_half(n, half)}
        moved = _drop_movement_islands(graph, half, self.config.keep_io_types)
        if not half:
            return ir.passes.PassResult(model, modified=False)
        taken: set[str] = set()
        casts = _CastCache(graph, taken)
        weights = self._convert_initializers(graph, half)
        converted = self._retype_nodes(graph, half)
        self._insert_boundaries(graph, half, casts)
        self.details = {"float16_nodes": len(half), "float32_nodes": len(graph) - len(half) - casts.count,
                        "weights_converted": weights, "casts": casts.count, "retyped_values": converted,
                        "movement_kept_float32": moved}  # fmt: skip
        return ir.passes.PassResult(model, modified=True)

    def _convertible(self, node: ir.Node) -> bool:
        if node.domain not in ("", "ai.onnx") or node.op_type in self.config.exclude_op_types:
            return False
        if node.op_type not in FP16_OPS or (node.op_type == "LayerNormalization" and len(node.outputs) > 1):
            return False
        values = [v for v in (*node.inputs, *node.outputs) if v is not None]
        if any(v.type is None or not isinstance(v.type, ir.TensorType) for v in values):
            return False  # unknown or non-tensor types: a boundary Cast could not be placed
        if edit.excluded(node, self.config.exclude):
            return False
        if not any(v.dtype in _FLOAT_TYPES for v in values) and node.op_type not in ("Cast", "Constant"):
            return False
        if node.op_type == "Cast" and node.attributes.get_int("to", 0) != ir.DataType.FLOAT.value:
            return node.inputs[0] is not None and node.inputs[0].dtype in _FLOAT_TYPES
        return all(self.magnitudes.get(v.name, 0.0) <= self.config.max_abs for v in values if v.dtype in _FLOAT_TYPES)

    def _convert_initializers(self, graph: ir.Graph, half: set[int]) -> int:
        count = 0
        for value in list(graph.initializers.values()):
            if value.dtype not in _FLOAT_TYPES or value.is_graph_input() or value.is_graph_output():
                continue
            users = [u.node for u in value.uses()]
            if users and all(id(n) in half for n in users):
                array = value.const_value.numpy()
                if np.abs(array).max(initial=0.0) > FP16_MAX:
                    continue
                value.const_value = ir.tensor(array.astype(np.float16), name=value.name)
                value.type = ir.TensorType(ir.DataType.FLOAT16)
                count += 1
        return count

    def _retype_nodes(self, graph: ir.Graph, half: set[int]) -> int:
        count = 0
        for node in graph:
            if id(node) not in half:
                continue
            if node.op_type == "Cast" and node.attributes.get_int("to", 0) == ir.DataType.FLOAT.value:
                node.attributes["to"] = ir.AttrInt64("to", ir.DataType.FLOAT16.value)
            if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
                tensor = node.attributes["value"].as_tensor()
                if tensor.dtype == ir.DataType.FLOAT:
                    node.attributes["value"] = ir.AttrTensor("value", ir.tensor(tensor.numpy().astype(np.float16)))
            for out in node.outputs:
                if out.dtype in _FLOAT_TYPES:
                    out.type = ir.TensorType(ir.DataType.FLOAT16)
                    count += 1
        return count

    def _insert_boundaries(self, graph: ir.Graph, half: set[int], casts: _CastCache) -> None:
        for node in list(graph):
            if node.op_type == "Cast" and node.name in casts.names:
                continue
            is_half = id(node) in half
            for index, value in enumerate(node.inputs):
                if value is None or value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
                    continue
                wanted = ir.DataType.FLOAT16 if is_half else ir.DataType.FLOAT
                if value.dtype != wanted:
                    node.replace_input_with(index, casts.get(value, wanted, before=node))
        # If/Loop/Scan bodies stay float32: a body node reading a now-float16 outer value reads a float32 copy.
        for node in list(graph):
            for value in node.outputs:
                if value.dtype != ir.DataType.FLOAT16:
                    continue
                for use in list(value.uses()):
                    if use.node.graph is not graph and use.node.op_type != "Cast":
                        use.node.replace_input_with(use.idx, casts.get(value, ir.DataType.FLOAT, before=node))
        for value in list(graph.inputs):
            if value.dtype == ir.DataType.FLOAT and not self.config.keep_io_types:
                value.type = ir.TensorType(ir.DataType.FLOAT16)
        for index, value in enumerate(list(graph.outputs)):
            if value.dtype == ir.DataType.FLOAT16 and self.config.keep_io_types and id(value) in self._float_outputs:
                graph.outputs[index] = casts.output(value)


# Ops that only move or select values: in float16 they save nothing unless a float16 op is next to them.
_MOVEMENT = frozenset(
    {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Slice", "Split", "Gather",
     "Concat", "Expand", "Tile", "Pad"}
)  # fmt: skip


def _drop_movement_islands(graph: ir.Graph, half: set[int], keep_io_types: bool) -> int:
    """Keep in float32 the data-movement nodes on the edge of a float16 region (repeatedly): with no float16 op
    on one side, converting them saves no Cast (none on either side: two more), and the float32 side is the
    exact one. ONNX Runtime 1.31 crashed optimizing a float16 Transpose between a float16 Relu and a Cast into
    a float32 GRU (nsnet2-16k); with the Transpose in float32 the Cast comes first."""

    def half_side(value: ir.Value | None, producer_side: bool) -> bool:
        if value is None or value.dtype != ir.DataType.FLOAT:
            return False
        if producer_side:
            producer = value.producer()
            if producer is None:  # a graph input (float16 unless io types are kept) or an initializer (follows)
                return value.is_graph_input() and not keep_io_types
            return id(producer) in half
        if value.is_graph_output() and not keep_io_types:
            return True
        return any(id(use.node) in half and use.node.graph is graph for use in value.uses())

    dropped = 0
    changed = True
    while changed:
        changed = False
        for node in graph:
            if id(node) not in half or node.op_type not in _MOVEMENT:
                continue
            fed_half = any(half_side(v, True) for v in node.inputs)
            read_half = any(half_side(v, False) for v in node.outputs)
            if fed_half and read_half:
                continue
            half.discard(id(node))
            dropped += 1
            changed = True
    return dropped


def _read_in_half(node: ir.Node, half: set[int]) -> bool:
    return any(id(use.node) in half for out in node.outputs for use in out.uses())


class _CastCache:
    """One Cast per (value, target type), inserted right after the value is produced."""

    def __init__(self, graph: ir.Graph, taken: set[str]) -> None:
        self.graph, self.taken = graph, taken
        self.cache: dict[tuple[int, ir.DataType], ir.Value] = {}
        self.names: set[str] = set()
        self.count = 0

    def get(self, value: ir.Value, dtype: ir.DataType, before: ir.Node) -> ir.Value:
        key = (id(value), dtype)
        if key not in self.cache:
            suffix = "fp16" if dtype == ir.DataType.FLOAT16 else "fp32"
            out = ir.Value(
                name=edit.unique_name(self.graph, f"{value.name}_{suffix}", self.taken),
                shape=value.shape,
                type=ir.TensorType(dtype),
            )
            cast = ir.node("Cast", [value], {"to": dtype.value}, outputs=[out], name=out.name)
            producer = value.producer()
            if producer is not None and producer.graph is self.graph:
                self.graph.insert_after(producer, cast)
            else:
                self.graph.insert_before(next(iter(self.graph)), cast)
            self.names.add(cast.name)
            self.cache[key] = out
            self.count += 1
        return self.cache[key]

    def output(self, value: ir.Value) -> ir.Value:
        """A float32 copy of a float16 graph output that takes over the output's name."""
        name = value.name
        value.name = edit.unique_name(self.graph, f"{name}_fp16", self.taken)
        out = ir.Value(name=name, shape=value.shape, type=ir.TensorType(ir.DataType.FLOAT))
        cast = ir.node("Cast", [value], {"to": ir.DataType.FLOAT.value}, outputs=[out], name=f"{name}_to_fp32")
        producer = value.producer()
        if producer is not None:
            self.graph.insert_after(producer, cast)
        else:
            self.graph.append(cast)
        self.names.add(cast.name)
        self.count += 1
        return out
