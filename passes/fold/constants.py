"""Constant folding and graph cleanup, built on onnxscript's optimizer and onnx_ir's passes."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from graphopt.passes import edit
from graphopt.passes.fold import private_api
from graphopt.passes.fold.config import FoldConfig
from graphopt.passes.fold.optimizer import build_optimizer

logger = logging.getLogger(__name__)

# Tensors at most this large are folded even when several nodes read them: duplicating a
# small constant costs nothing, duplicating a weight would grow the model.
_SHARED_INPUT_LIMIT = 8192
# ConstantOfShape outputs at most this large are folded into constants.
_SMALL_FILL = 1024
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


class FoldConstantsPass(ir.passes.InPlacePass):
    """Fold constant subgraphs, BatchNorm into Conv/Gemm, and remove dead, identity and duplicate nodes.

    Runs onnxscript's optimizer (constant folding with raised size limits, its default
    rewrite rules including BatchNorm fusion) and onnx_ir's cleanup passes (unused nodes
    and functions, Identity, common subexpressions, duplicate initializers). Q/DQ nodes are
    never folded, so quantized models keep their quantization. Graph input and output names,
    types and shapes are preserved. Subgraphs (If/Loop/Scan) are folded; functions are
    inlined when ``inline_functions`` is set, otherwise folded in place.

    Attributes:
        config: The pass options.
    """

    def __init__(self, config: FoldConfig | None = None) -> None:
        super().__init__()
        self.config = config or FoldConfig()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = _fingerprint(model)
        names = ([v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs])
        # A declared output shape is the exporter's claim, not a fact: ddddocr declares [1, seqlen] for
        # logits it returns as [T, 1, classes]. No rewrite may compute with it; it is put back after.
        declared = [v.shape for v in model.graph.outputs]
        for value in model.graph.outputs:
            value.shape = None
        try:
            with _shielded(model):
                self._optimize(model)
        finally:  # by position: a rewrite may have put another value in an output's place
            for value, shape in zip(model.graph.outputs, declared, strict=True):
                value.shape = shape
        if ([v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]) != names:
            raise RuntimeError(f"fold renamed graph inputs/outputs {names} (a bug in graphopt or its dependencies)")
        modified = _fingerprint(model) != before
        logger.debug("fold: modified=%s", modified)
        return ir.passes.PassResult(model, modified=modified)

    def _optimize(self, model: ir.Model) -> None:
        if self.config.shape_inference and not _fully_typed(model):
            _infer_shapes(model)
        build_optimizer(
            iterations=self.config.iterations,
            # Node-level inference is a quarter of fold's time; exporters that record every
            # value's type and shape (torch's dynamo exporter does) make it redundant.
            shape_inference=self.config.shape_inference and not _fully_typed(model),
            size_limit=self.config.size_limit,
            should_fold=self._should_fold,
            inline=self.config.inline_functions,
        )(model)
        ir.passes.Sequential(
            private_api.IdentityEliminationPass(),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.TopologicalSortPass(),
        )(model)
        _fit_attributes_to_opset(model)

    def _should_fold(self, node: ir.Node) -> bool | None:
        """Veto folds that would drop quantization, duplicate a shared weight or pass the size limit."""
        if node.domain in ("", "ai.onnx") and node.op_type in _QDQ_OPS:
            return False
        for value in node.inputs:
            if value is None or value.const_value is None:
                continue
            size = value.const_value.size
            if size > self.config.size_limit or (size > _SHARED_INPUT_LIMIT and len(value.uses()) > 1):
                return False
        if _widens(node):
            return False
        return True if _small_constant_of_shape(node) else None


# Attributes onnxscript's rewrites write with their default value, and the opset that added them:
# in an older model they are unknown (onnx.checker and ONNX Runtime refuse them) and mean nothing.
_NEWER_DEFAULTS = {("Reshape", "allowzero"): (14, 0)}


def _fit_attributes_to_opset(model: ir.Model) -> int:
    """Drop default-valued attributes the model's opset does not have yet (``Reshape(allowzero=0)`` at opset 12)."""
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    dropped = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        for name in list(node.attributes):
            since, default = _NEWER_DEFAULTS.get((node.op_type, name), (0, None))
            if opset < since and (node.attributes[name].value == default or _allowzero_moot(node, name)):
                del node.attributes[name]
                dropped += 1
    return dropped


def _allowzero_moot(node: ir.Node, name: str) -> bool:
    """``allowzero=1`` means what ``allowzero=0`` means when the constant target shape holds no 0."""
    if (node.op_type, name) != ("Reshape", "allowzero") or len(node.inputs) < 2 or node.inputs[1] is None:
        return False
    shape = node.inputs[1].const_value
    return shape is not None and 0 not in shape.numpy().tolist()


_SHIELD_DOMAIN = "graphopt.shielded"


def _needs_shield(node: ir.Node) -> bool:
    """Nodes that onnxscript 0.7's evaluators mishandle: keep them away from the optimizer.

    CastLike loses its ``saturate``/``round_mode`` attributes when turned into Cast, and
    SplitToSequence with a split that is not a constant crashes the evaluator.
    """
    if node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type == "CastLike":
        return "saturate" in node.attributes or "round_mode" in node.attributes
    if node.op_type == "SplitToSequence" and len(node.inputs) > 1 and node.inputs[1] is not None:
        return node.inputs[1].const_value is None
    return False


@contextlib.contextmanager
def _shielded(model: ir.Model) -> Iterator[None]:
    """Move fragile nodes to a private domain while the optimizer runs, then restore them.

    Only default-domain nodes are shielded, so restoring means the default domain again;
    copies made by function inlining are restored too.
    """
    nodes = [n for n in edit.all_nodes(model) if _needs_shield(n)]
    if not nodes:
        yield
        return
    model.opset_imports.setdefault(_SHIELD_DOMAIN, 1)
    for node in nodes:
        node.domain = _SHIELD_DOMAIN
    try:
        yield
    finally:
        for node in edit.all_nodes(model):
            if node.domain == _SHIELD_DOMAIN:
                node.domain = ""
        model.opset_imports.pop(_SHIELD_DOMAIN, None)


def _fully_typed(model: ir.Model) -> bool:
    """Whether every value of every graph already has a dtype and a shape."""
    for graph in model.graphs():
        for node in graph:
            for out in node.outputs:
                if out.type is None or (isinstance(out.type, ir.TensorType) and out.shape is None):
                    return False
    return not model.functions


def _infer_shapes(model: ir.Model) -> None:
    """Whole-model ONNX shape inference (C++, one call), so the folder needs none node by node.

    Node-by-node inference cost a quarter of a millisecond per node: most of fold's time on a
    large graph. Only main-graph tensor values take the result: onnx_ir's merge writes a dtype
    onto sequence and optional values (making them tensors), and ONNX's inference can retype
    subgraph values in ways ONNX Runtime rejects; those keep what they had. Where a value stays
    untyped (an op onnx does not know), the folder still infers node by node.
    """
    kept = {value: (value.type, value.shape) for value in model.graph.inputs}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        body = node.graph is not model.graph
        for out in node.outputs:
            tensor = out.type is None or isinstance(out.type, ir.TensorType)
            if body or node.op_type in edit.NON_TENSOR_PRODUCERS or not tensor:
                kept[out] = (out.type, out.shape)
        for graph in edit.bodies(node):
            kept.update({value: (value.type, value.shape) for value in graph.inputs})
    try:
        common_passes.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    except Exception as exc:  # onnx's inference raises its own error types; the folder's still runs
        logger.debug("fold: whole-model shape inference failed (%s); inferring node by node", exc)
    for value, (type_, shape) in kept.items():
        value.type, value.shape = type_, shape


def _small_constant_of_shape(node: ir.Node) -> bool:
    """A ConstantOfShape whose output is a small constant (onnxscript keeps every one, to save space).

    Shape arithmetic often builds a few-element vector this way (``ConstantOfShape([3]) * -1``
    compared with a constant); folding it lets the rest of the chain fold. Large fills stay.
    """
    if node.op_type != "ConstantOfShape" or node.domain not in ("", "ai.onnx") or not node.inputs:
        return False
    shape = node.inputs[0].const_value if node.inputs[0] is not None else None
    return shape is not None and int(np.prod(shape.numpy())) <= _SMALL_FILL


def _widens(node: ir.Node) -> bool:
    """Folding would store compressed constants in a wider type (float16 scales cast to float32)."""
    inputs = [v for v in node.inputs if v is not None]
    if not inputs or any(v.const_value is None for v in inputs) or sum(v.const_value.size for v in inputs) < 1024:
        return False
    out = node.outputs[0].dtype if node.outputs else None
    widest = max(v.const_value.dtype.itemsize for v in inputs)
    return out is not None and out.itemsize > widest


def _fingerprint(model: ir.Model) -> tuple[object, ...]:
    """A structural summary that changes whenever a fold or cleanup rewrites the model."""
    parts: list[object] = [len(model.functions)]
    for graph in model.graphs():
        parts.append(tuple(v.name for v in graph.inputs))
        parts.append(tuple(v.name for v in graph.outputs))
        parts.append(
            tuple(
                sorted(
                    (n, v.const_value.shape.dims if v.const_value is not None else None)
                    for n, v in graph.initializers.items()
                )
            )
        )
        parts.append(
            tuple(
                (
                    n.domain,
                    n.op_type,
                    tuple(v.name if v is not None else "" for v in n.inputs),
                    tuple(v.name for v in n.outputs),
                )
                for n in graph
            )
        )
    for function in model.functions.values():
        parts.append(tuple((n.op_type, len(n.inputs)) for n in function))
    return tuple(parts)
