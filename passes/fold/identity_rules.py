"""Binary ops with a neutral constant operand are identities, whatever the constant's shape.

onnxscript's own rules take only scalars (``x * 1``; its TODO says 1-D constants are not
supported); Paddle exports swish as ``x * Sigmoid(x * [1.0])`` with a shape-``[1]`` one.
The constant may be any shape that broadcasts without growing ``x``: every dimension 1 or
equal to ``x``'s.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

# op type -> (neutral value, whether the constant may be the left operand)
_NEUTRAL = {"Mul": (1, True), "Add": (0, True), "Div": (1, False), "Sub": (0, False)}


def _neutral(x: ir.Value, constant: ir.Value, out: ir.Value, value: int) -> bool:
    tensor = constant.const_value
    if tensor is None or x.shape is None or x.dtype is None or tensor.dtype != x.dtype or out.dtype != x.dtype:
        return False
    array = tensor.numpy()
    if array.ndim > len(x.shape) or array.size == 0 or not np.all(array == value):
        return False
    dims = list(x.shape)[len(x.shape) - array.ndim :]
    return all(c == 1 or c == d for c, d in zip(array.shape, dims, strict=True))


class NeutralOperand(pattern.RewriteRuleClassBase):
    """``x * ones``, ``x + zeros``, ``x / ones``, ``x - zeros`` (and ``ones * x``, ``zeros + x``) are ``x``."""

    def __init__(self, op_type: str, constant_first: bool) -> None:
        super().__init__(f"Neutral{op_type}{'Left' if constant_first else ''}")
        self.op_type, self.constant_first = op_type, constant_first

    def pattern(self, op, x, c):  # type: ignore[no-untyped-def]
        operands = (c, x) if self.constant_first else (x, c)
        return getattr(op, self.op_type)(*operands, _outputs=["out"])

    def check(self, context, x, c, out, **_):  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        if not _neutral(x, c, out, _NEUTRAL[self.op_type][0]):
            return result.fail("the operand is not a neutral constant that broadcasts without growing x")
        return result

    def rewrite(self, op, x, c, out, **_):  # type: ignore[no-untyped-def]
        return op.Identity(x)


def identity_rules() -> list[pattern.RewriteRule]:
    """One rule per op and operand order."""
    rules = []
    for op_type, (_, commutes) in _NEUTRAL.items():
        rules.append(NeutralOperand.rule(op_type, False))
        if commutes:
            rules.append(NeutralOperand.rule(op_type, True))
    return rules
