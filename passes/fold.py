"""Constant folding and graph cleanup, built on onnxscript's optimizer and onnx_ir's passes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer

logger = logging.getLogger(__name__)

# Tensors at most this large are folded even when several nodes read them: duplicating a
# small constant costs nothing, duplicating a weight would grow the model.
_SHARED_INPUT_LIMIT = 8192
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


@dataclass(frozen=True)
class FoldConfig:
    """Options of the ``fold`` pass."""

    size_limit: int = field(
        default=1 << 28,
        metadata={"help": "Largest constant (elements) folding may read or create; weight-sized by default."},
    )
    iterations: int = field(default=3, metadata={"help": "Fold-and-rewrite rounds; stops early when nothing changes."})
    inline_functions: bool = field(
        default=True, metadata={"help": "Inline model-local functions first so their bodies fold too."}
    )
    shape_inference: bool = field(
        default=True, metadata={"help": "Infer shapes node by node, which lets Shape/Size-driven subgraphs fold."}
    )


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
        optimizer.optimize_ir(
            model,
            num_iterations=self.config.iterations,
            onnx_shape_inference=self.config.shape_inference,
            input_size_limit=self.config.size_limit,
            output_size_limit=self.config.size_limit,
            should_fold=self._should_fold,
            inline=self.config.inline_functions,
        )
        ir.passes.Sequential(
            common_passes.IdentityEliminationPass(),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.TopologicalSortPass(),
        )(model)
        modified = _fingerprint(model) != before
        logger.debug("fold: modified=%s", modified)
        return ir.passes.PassResult(model, modified=modified)

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
        return None


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
