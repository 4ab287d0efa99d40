"""Graph edits of the ``weight_only`` pass: quantized weights as ONNX Runtime kernels or standard ops.

- ``matmul_nbits``: ``MatMul(A, W)`` -> ``com.microsoft.MatMulNBits(A, B, scales[, zero_points])``;
- ``qdq``: ``W`` -> ``DequantizeLinear(codes, scales[, zero_points], axis=0, block_size)`` (opset 21);
- ``nf4``/``fp4``: ``MatMul(A, W)`` -> ``com.microsoft.MatMulBnb4(A, B, absmax)``, the absmax
  dequantized from int8 by Cast/Expand/Mul/Add when double-quantized;
- Gather of an embedding table -> ``com.microsoft.GatherBlockQuantized``.

Gemm becomes the same MatMul form plus an ``Add`` of ``beta * C`` (ORT folds it back as a bias).
Scales stored as float16 go through a ``Cast`` to float32, which ONNX Runtime folds once at
load time; the file keeps the small form. Layers that share a weight share its initializers.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.errors import PassError
from graphopt.numerics.blocks import IntBlocks, fits_float16, matmul_nbits_layout, pack_nibbles
from graphopt.numerics.nf4 import Bnb4Blocks, DoubleQuant, matmul_bnb4_layout
from graphopt.passes.edit import all_nodes, replace_node, unique_name
from graphopt.passes.weight_only.config import WeightOnlyConfig
from graphopt.passes.weight_only.layers import Layer

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
QDQ_OPSET = 21  # blocked DequantizeLinear and INT4/UINT4 need opset 21 (and IR 10)
_INT_TYPES = {(4, True): ir.DataType.INT4, (4, False): ir.DataType.UINT4, (8, True): ir.DataType.INT8}
_INT_TYPES[(8, False)] = ir.DataType.UINT8


class Lowering:
    """Rewrites quantized layers into the configured ONNX form.

    New weights go in ``graph`` (the main graph); nodes go in the graph of the layer they replace,
    so a layer inside an If/Loop/Scan body reads its quantized weights from the outer scope.
    """

    def __init__(self, graph: ir.Graph, config: WeightOnlyConfig) -> None:
        self.graph, self.config = graph, config
        self.taken: set[str] = set()
        self.bytes_after = 0
        self.needs_ir10 = False  # set once an INT4/UINT4 tensor is written
        self._anchor: ir.Node | None = None  # the layer being lowered
        self._last_helper: ir.Node | None = None  # the last node _prepend placed
        self.cast_scales = False  # set once float16 scales reach a kernel through a Cast
        self._shared: dict[str, list[ir.Value]] = {}
        self._constants: dict[tuple[object, ...], ir.Value] = {}

    # -- initializers and helper nodes ---------------------------------------------------
    def _initializer(
        self,
        base: str,
        array: np.ndarray,
        dtype: ir.DataType | None = None,
        shape: tuple[int, ...] = (),
        *,
        weight: bool = True,
    ) -> ir.Value:
        """A new initializer; ``weight`` ones count in :attr:`bytes_after` (a Gemm bias does not)."""
        name = unique_name(self.graph, base, self.taken)
        if dtype in (ir.DataType.INT4, ir.DataType.UINT4):
            tensor: ir.TensorProtocol = ir.PackedTensor(array, dtype, shape=shape, name=name)
            self.needs_ir10 = True
        else:
            tensor = ir.tensor(array, dtype=dtype, name=name)
            shape = array.shape
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(value)
        self.bytes_after += tensor.nbytes if weight else 0
        return value

    def _constant(self, values: tuple[int, ...]) -> ir.Value:
        """A shared int64 constant (shapes, slice bounds)."""
        if values not in self._constants:
            self._constants[values] = self._initializer("weight_only_const", np.array(values, np.int64))
        return self._constants[values]

    def _prepend(self, op: str, inputs: list[ir.Value | None], base: str, **attributes: object) -> ir.Value:
        """A node computing from constants (ORT folds it at load), placed at the head of the main graph after the
        helpers before it: every reader, whatever its graph or the order layers are lowered in, comes later (a
        tied table reads the scales its LM head made)."""
        out = ir.Value(name=unique_name(self.graph, base, self.taken))
        node = ir.node(op, inputs, attributes, outputs=[out], name=out.name)
        if self._last_helper is None:
            self.graph.insert_before(next(iter(self.graph)), node)
        else:
            self.graph.insert_after(self._last_helper, node)
        self._last_helper = node
        return out

    def _scales(self, base: str, scales: np.ndarray, dtype: ir.DataType = ir.DataType.FLOAT) -> ir.Value:
        if dtype == ir.DataType.FLOAT16:  # the layer computes in float16: its scales are float16 too
            return self._initializer(f"{base}_scales", scales.astype(np.float16))
        # In an If/Loop body, ONNX Runtime 1.31's MatMulNBits returns zeros when its scales come
        # from a node (this Cast) and graph optimizations are off: there they stay float32.
        in_body = self._anchor is not None and _graph_of(self._anchor) is not self.graph
        if self.config.scale_type == "float16" and fits_float16(scales) and not in_body:
            stored = self._initializer(f"{base}_scales_fp16", scales.astype(np.float16))
            out = self._prepend("Cast", [stored], f"{base}_scales", to=ir.DataType.FLOAT)
            self.cast_scales = True
            out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(scales.shape)
            return out
        return self._initializer(f"{base}_scales", scales.astype(np.float32))

    def _int_tensor(self, base: str, codes: np.ndarray, bits: int, signed: bool) -> ir.Value:
        dtype = _INT_TYPES[(bits, signed)]
        if bits == 4:
            return self._initializer(base, pack_nibbles(codes.reshape(-1)), dtype, codes.shape)
        return self._initializer(base, codes, dtype)

    # -- MatMul / Gemm ------------------------------------------------------------------
    def matmul(self, layer: Layer, blocks: IntBlocks | Bnb4Blocks, key: str) -> None:
        """Replace ``layer`` (MatMul or Gemm) by its quantized form."""
        self._anchor = layer.node
        if isinstance(blocks, Bnb4Blocks):
            self._replace(layer, self._bnb4(layer, blocks, key))
        elif self.config.format == "qdq":
            self._qdq(layer, blocks, key)
        else:
            self._replace(layer, self._nbits(layer, blocks, key))

    def _nbits_inputs(self, blocks: IntBlocks, key: str, dtype: ir.DataType) -> list[ir.Value]:
        """MatMulNBits' ``B, scales[, zero_points]`` for ``blocks``, written once per key."""
        if key not in self._shared:
            data, scales, zero_points = matmul_nbits_layout(blocks)
            values = [self._initializer(f"{key}_Q{blocks.bits}", data), self._scales(key, scales, dtype)]
            if zero_points is not None:
                values.append(self._initializer(f"{key}_zero_points", zero_points))
            self._shared[key] = values
        return self._shared[key]

    def _nbits(self, layer: Layer, blocks: IntBlocks, key: str) -> ir.Node:
        self._nbits_inputs(blocks, key, layer.dtype)
        attributes = {"K": layer.k, "N": layer.n, "bits": blocks.bits, "block_size": blocks.block_size}
        level = self.config.kernel_accuracy_level_for(blocks.bits)
        if level:
            attributes["accuracy_level"] = level
        return self._node("MatMulNBits", [layer.node.inputs[0], *self._shared[key]], attributes, layer, MS_DOMAIN)

    def _bnb4(self, layer: Layer, blocks: Bnb4Blocks, key: str) -> ir.Node:
        if key not in self._shared:
            data, absmax = matmul_bnb4_layout(blocks)
            stored = self._initializer(f"{key}_{blocks.quant_type}", data)
            scale = (
                self._double_dequant(key, blocks.double, layer.dtype)
                if blocks.double
                else self._initializer(f"{key}_absmax", absmax.astype(layer.dtype.numpy()))
            )
            self._shared[key] = [stored, scale]
        attributes = {
            "K": layer.k,
            "N": layer.n,
            "block_size": blocks.block_size,
            "quant_type": 1 if blocks.quant_type == "nf4" else 0,
        }
        return self._node("MatMulBnb4", [layer.node.inputs[0], *self._shared[key]], attributes, layer, MS_DOMAIN)

    def _double_dequant(self, key: str, double: DoubleQuant, dtype: ir.DataType) -> ir.Value:
        """absmax = Cast(codes) * repeat(scales, 256)[:n] + offset, in standard ONNX ops (then Cast to ``dtype``)."""
        n, groups = len(double.codes), len(double.scales)
        codes = self._initializer(f"{key}_absmax_int8", double.codes)
        scales = self._initializer(f"{key}_absmax_scales", double.scales.reshape(groups, 1))
        offset = self._initializer(f"{key}_absmax_offset", np.array(double.offset, np.float32))
        as_float = self._prepend("Cast", [codes], f"{key}_absmax_float", to=ir.DataType.FLOAT)
        spread = self._prepend("Expand", [scales, self._constant((groups, double.block_size))], f"{key}_absmax_spread")
        flat = self._prepend("Reshape", [spread, self._constant((-1,))], f"{key}_absmax_flat")
        if groups * double.block_size != n:
            flat = self._prepend("Slice", [flat, self._constant((0,)), self._constant((n,))], f"{key}_absmax_cut")
        scaled = self._prepend("Mul", [as_float, flat], f"{key}_absmax_scaled")
        absmax = self._prepend("Add", [scaled, offset], f"{key}_absmax")
        absmax.type, absmax.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape((n,))
        if dtype != ir.DataType.FLOAT:
            absmax = self._prepend("Cast", [absmax], f"{key}_absmax_{dtype.name.lower()}", to=dtype)
            absmax.type, absmax.shape = ir.TensorType(dtype), ir.Shape((n,))
        return absmax

    def _qdq(self, layer: Layer, blocks: IntBlocks, key: str) -> None:
        if key not in self._shared:
            inputs = [self._int_tensor(f"{key}_quantized", blocks.codes, blocks.bits, blocks.symmetric)]
            inputs.append(self._scales(key, blocks.scales, layer.dtype))
            if blocks.zero_points is not None:
                inputs.append(self._int_tensor(f"{key}_zero_point", blocks.zero_points, blocks.bits, False))
            self._shared[key] = inputs
        weight = layer.weight
        out = ir.Value(
            name=unique_name(self.graph, f"{key}_DequantizeLinear", self.taken),
            shape=ir.Shape((layer.k, layer.n)),
            type=ir.TensorType(layer.dtype),
        )
        attributes = {"axis": 0, "block_size": blocks.block_size}
        dq = ir.node("DequantizeLinear", self._shared[key], attributes, outputs=[out], name=out.name)
        _graph_of(layer.node).insert_before(layer.node, dq)
        if layer.kind == "matmul":
            layer.node.replace_input_with(1, out)
        else:
            self._replace(layer, self._node("MatMul", [layer.node.inputs[0], out], {}, layer))
        logger.debug("weight_only: %s reads %s through a blocked DequantizeLinear", layer.node.name, weight.name)

    def _node(
        self, op: str, inputs: list[ir.Value | None], attributes: dict[str, object], layer: Layer, domain: str = ""
    ) -> ir.Node:
        base = layer.node.name or layer.node.outputs[0].name or op
        out = ir.Value(name=unique_name(self.graph, f"{base}_{op}", self.taken))
        return ir.node(op, inputs, attributes, domain=domain, outputs=[out], name=out.name)

    def _replace(self, layer: Layer, node: ir.Node) -> None:
        """Put ``node`` (plus Gemm's bias Add) in place of ``layer.node``, keeping its output value's name."""
        nodes = [node, *self._gemm_bias(layer, node.outputs[0])]
        old = layer.node.outputs[0]
        new = nodes[-1].outputs[0]
        new.shape, new.type = old.shape, old.type
        replace_node(_graph_of(layer.node), layer.node, nodes, new)

    def _gemm_bias(self, layer: Layer, product: ir.Value) -> list[ir.Node]:
        node = layer.node
        bias = node.inputs[2] if layer.kind == "gemm" and len(node.inputs) > 2 else None
        if bias is None:
            return []
        beta = node.attributes.get_float("beta", 1.0)
        if beta != 1.0 and bias.const_value is not None:
            scaled = (bias.const_value.numpy() * beta).astype(bias.const_value.numpy().dtype)
            bias = self._initializer(f"{bias.name}_beta", scaled, weight=False)
        elif beta != 1.0:
            factor = self._initializer(f"{node.name}_beta", np.array(beta, layer.dtype.numpy()), weight=False)
            scaled = self._node("Mul", [bias, factor], {}, layer)
            return [scaled, self._node("Add", [product, scaled.outputs[0]], {}, layer)]
        return [self._node("Add", [product, bias], {}, layer)]

    # -- Gather -------------------------------------------------------------------------
    def gather(self, layer: Layer, blocks: IntBlocks, key: str) -> None:
        """Replace an embedding Gather by GatherBlockQuantized (codes and scales transposed to [V, D])."""
        self._anchor = layer.node
        if self._shares_head_codes(layer, blocks):
            self._tied_gather(layer, blocks)
            return
        if key not in self._shared:
            codes = np.ascontiguousarray(blocks.codes.T)
            if blocks.bits == 8 and blocks.symmetric:
                # uint8 data without zero points is read with the default zero point 128.
                data = self._initializer(f"{key}_quantized", (codes.astype(np.int16) + 128).astype(np.uint8))
            else:
                data = self._int_tensor(f"{key}_quantized", codes, blocks.bits, blocks.symmetric and blocks.bits == 4)
            inputs = [data, self._scales(key, np.ascontiguousarray(blocks.scales.T), layer.dtype)]
            if blocks.zero_points is not None:
                zero = np.ascontiguousarray(blocks.zero_points.T)
                inputs.append(self._int_tensor(f"{key}_zero_point", zero, blocks.bits, False))
            self._shared[key] = inputs
        data, scales, *zero = self._shared[key]
        attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": blocks.block_size, "bits": blocks.bits}
        inputs = [data, layer.node.inputs[1], scales, *zero]
        self._replace(layer, self._node("GatherBlockQuantized", inputs, attributes, layer, MS_DOMAIN))

    def _shares_head_codes(self, layer: Layer, blocks: IntBlocks) -> bool:
        """Whether a tied table can read the LM head's MatMulNBits bytes: [N, kb, blob] is [V, D*bits/8] when D
        fills whole blocks, and symmetric codes need no zero points (both ops default to 2^(bits-1))."""
        return (
            layer.via is not None
            and self.config.format == "matmul_nbits"
            and blocks.symmetric
            and layer.k % blocks.block_size == 0
        )

    def _tied_gather(self, layer: Layer, blocks: IntBlocks) -> None:
        """A tied table as GatherBlockQuantized over the LM head's own B and scales (a Reshape of B): one copy
        of the codes in the file, as ORT GenAI's builder writes it."""
        data, scales, *_ = self._nbits_inputs(blocks, layer.weight.name, layer.dtype)
        rows = self._constant((layer.n, layer.k * blocks.bits // 8))
        table = self._prepend("Reshape", [data, rows], f"{layer.weight.name}_table")
        table.type, table.shape = ir.TensorType(ir.DataType.UINT8), ir.Shape((layer.n, layer.k * blocks.bits // 8))
        attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": blocks.block_size, "bits": blocks.bits}
        inputs = [table, layer.node.inputs[1], scales]
        self._replace(layer, self._node("GatherBlockQuantized", inputs, attributes, layer, MS_DOMAIN))


def raise_opset(model: ir.Model, target: int = QDQ_OPSET) -> int | None:
    """Raise the default-domain opset to ``target`` after checking every op is still valid there.

    Returns the previous opset, or None when it was already high enough. Raises PassError
    naming the nodes whose op changed incompatibly (an attribute moved to an input, a
    different number of inputs, a removed op).
    """
    current = model.opset_imports.get("", 1)
    if current >= target:
        return None
    problems = []
    for node in _default_domain_nodes(model):
        problem = _schema_problem(node, current, target)
        if problem:
            problems.append(f"{node.name or node.op_type} ({node.op_type}) {problem}")
    if problems:
        listed = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise PassError(
            f"weight_only: format 'qdq' needs opset {target} (blocked DequantizeLinear), but the model is at "
            f"opset {current} and cannot simply be raised: {listed}. Re-export the model with "
            f"opset_version={target}, or use format 'matmul_nbits'."
        )
    model.opset_imports[""] = target
    for function in model.functions.values():
        if "" in function.opset_imports:
            function.opset_imports[""] = target
    return current


def _graph_of(node: ir.Node) -> ir.Graph:
    graph = node.graph
    if not isinstance(graph, ir.Graph):
        raise RuntimeError(f"weight_only: {node.name} is not in a graph (a bug)")
    return graph


def _default_domain_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in all_nodes(model) if n.domain in ("", "ai.onnx")]


def _schema_problem(node: ir.Node, current: int, target: int) -> str | None:
    """Why ``node`` (valid at opset ``current``) would not be valid at ``target``, or None."""
    try:
        new = onnx.defs.get_schema(node.op_type, target, "")
    except onnx.defs.SchemaError:
        return f"has no definition at opset {target}"
    try:
        old = onnx.defs.get_schema(node.op_type, current, "")
    except onnx.defs.SchemaError:
        old = None
    if old is not None and old.since_version == new.since_version:
        return None
    if new.deprecated:
        return f"is deprecated at opset {target}"
    removed = sorted(set(node.attributes) - set(new.attributes))
    if removed:
        return f"uses attribute(s) {', '.join(removed)} that opset {target} no longer has"
    missing = sorted(a for a, spec in new.attributes.items() if spec.required and a not in node.attributes)
    if missing:
        return f"lacks attribute(s) {', '.join(missing)} required at opset {target}"
    count = len(node.inputs)
    if not new.min_input <= count <= new.max_input:
        return f"has {count} inputs; opset {target} takes {new.min_input} to {new.max_input}"
    return None
