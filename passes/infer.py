"""Type inference for the passes: fill in missing main-graph tensor types without harm."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

# Ops whose outputs may be sequences or optionals: ONNX's inference has typed those as tensors.
_NON_TENSOR_PRODUCERS = frozenset(
    {"SequenceEmpty", "SequenceConstruct", "SequenceInsert", "SequenceErase", "SplitToSequence", "Optional",
     "OptionalGetElement", "Loop", "If", "Scan", "SequenceMap"}
)  # fmt: skip


def infer_types(model: ir.Model) -> None:
    """Fill in missing tensor types and shapes of main-graph values (exporters do not always write value_info).

    Inference runs on a copy and only missing main-graph tensor types are copied back:
    ONNX's inference can also rewrite subgraph types in ways ORT then rejects.
    """
    missing = {
        out.name: out
        for node in model.graph
        if node.op_type not in _NON_TENSOR_PRODUCERS
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
