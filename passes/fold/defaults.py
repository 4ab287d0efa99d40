"""Optional inputs that hold their default value are dropped.

PyTorch exports an RNN's zero initial state as ``ConstantOfShape(Concat(2, Shape(x)[1], H))``:
three to six nodes per LSTM/GRU, run on every call, computing what the operator assumes when
the input is absent (ONNX: "If not specified - assumed to be 0"). onnxsim drops them; so does
fold now, for initial hidden/cell states and peephole weights that are all zeros.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# Optional inputs whose absence means zeros, by op type: initial_h, initial_c, P (peepholes).
_ZERO_DEFAULTS = {"RNN": (5,), "GRU": (5,), "LSTM": (5, 6, 7)}
# Ops whose output is all zeros when their data input is (layout and type changes).
_KEEPS_ZEROS = frozenset(
    {"Slice", "Expand", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Cast", "Identity", "Tile"}
)


def _all_zeros(value: ir.Value | None) -> bool:
    """Whether the value is zeros wherever it is read, whatever its shape."""
    for _ in range(16):
        if value is None:
            return False
        if value.const_value is not None:
            return not np.any(value.const_value.numpy())
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return False
        if node.op_type == "ConstantOfShape":
            fill = node.attributes.get("value")
            return fill is None or not np.any(fill.as_tensor().numpy())
        if node.op_type not in _KEEPS_ZEROS or not node.inputs:
            return False
        value = node.inputs[0]
    return False


class DropZeroStatesPass(ir.passes.InPlacePass):
    """Drop all-zero initial states and peepholes of RNN, GRU and LSTM nodes (their default)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        dropped = 0
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            for index in _ZERO_DEFAULTS.get(node.op_type, ()):
                if index < len(node.inputs) and node.inputs[index] is not None and _all_zeros(node.inputs[index]):
                    node.replace_input_with(index, None)
                    dropped += 1
        return ir.passes.PassResult(model, modified=dropped > 0)
