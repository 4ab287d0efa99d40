"""Exact rewrite rules fold adds to onnxscript's: per-channel constant scales and shifts into a Conv.

Paddle and tf2onnx exports often keep a Conv's bias (and a folded BatchNorm's scale) as a
separate ``Add``/``Mul`` with a ``[1, C, 1, 1]`` constant; onnxscript's own affine rules only
take scalars after a Conv that has a bias. Written with onnxscript's public pattern API.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


def _out_channels(conv: ir.Node, weight: np.ndarray) -> int:
    """Conv weights are [C_out, C_in/group, ...]; ConvTranspose's are [C_in, C_out/group, ...]."""
    if conv.op_type == "ConvTranspose":
        return weight.shape[1] * conv.attributes.get_int("group", 1)
    return weight.shape[0]


def _channel_vector(value: ir.Value, conv_out: ir.Value, weight: np.ndarray) -> np.ndarray | None:
    """The constant as one value per output channel, when it broadcasts only along channels."""
    if value.const_value is None or conv_out.shape is None:
        return None
    array = value.const_value.numpy()
    rank, channels = len(conv_out.shape), _out_channels(conv_out.producer(), weight)
    if array.ndim > rank or array.dtype != weight.dtype:
        return None
    shape = (1,) * (rank - array.ndim) + array.shape
    if shape[0] != 1 or shape[1] not in (1, channels) or any(d != 1 for d in shape[2:]):
        return None
    return np.broadcast_to(array.reshape(-1), (channels,)).astype(weight.dtype)


class _ConvChannelAffine(pattern.RewriteRuleClassBase):
    """Conv(x, W[, B]) (or ConvTranspose, for Add) followed by a per-channel constant Add or Mul."""

    op_type = ""

    def __init__(self, with_bias: bool, conv_op: str = "Conv") -> None:
        super().__init__(f"{conv_op}{'Bias' if with_bias else ''}{self.op_type}Fusion")
        self.with_bias, self.conv_op = with_bias, conv_op

    def pattern(self, op, x, w, b, c):  # type: ignore[no-untyped-def]
        make = getattr(op, self.conv_op)
        if self.with_bias:
            conv = make(x, w, b, _allow_other_attributes=True, _outputs=["conv_out"])
        else:
            conv = make(x, w, _allow_other_attributes=True, _outputs=["conv_out"])
        return getattr(op, self.op_type)(conv, c)

    def check(self, context, x, w, c, conv_out, b=None, **_):  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        if w.const_value is None or (b is not None and b.const_value is None):
            return result.fail("the Conv's weight and bias are not constants")
        if _channel_vector(c, conv_out, w.const_value.numpy()) is None:
            return result.fail("the operand is not a constant that varies only along the output channels")
        return result

    def rewrite(self, op, x, w, c, conv_out, b=None, **_):  # type: ignore[no-untyped-def]
        weight = w.const_value.numpy()
        vector = _channel_vector(c, conv_out, weight)
        bias = b.const_value.numpy() if b is not None else np.zeros(len(vector), weight.dtype)
        weight, bias = self.fold(weight, bias, vector)  # type: ignore[arg-type]
        new_w = op.initializer(ir.tensor(weight), f"{w.name}_{self.op_type.lower()}")
        new_b = op.initializer(ir.tensor(bias), f"{(b.name if b is not None else w.name)}_{self.op_type.lower()}_bias")
        return getattr(op, self.conv_op)(x, new_w, new_b, **conv_out.producer().attributes)

    def fold(self, weight: np.ndarray, bias: np.ndarray, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class ConvChannelAdd(_ConvChannelAffine):
    op_type = "Add"

    def fold(self, weight: np.ndarray, bias: np.ndarray, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return weight, bias + vector


class ConvChannelMul(_ConvChannelAffine):
    op_type = "Mul"

    def fold(self, weight: np.ndarray, bias: np.ndarray, vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scale = vector.reshape((-1,) + (1,) * (weight.ndim - 1))
        return weight * scale, bias * vector


def channel_affine_rules() -> list[pattern.RewriteRule]:
    """The Add and Mul rules, with and without a Conv bias, in both operand orders; Add after a ConvTranspose."""
    rules = []
    for cls, conv_op in ((ConvChannelAdd, "Conv"), (ConvChannelMul, "Conv"), (ConvChannelAdd, "ConvTranspose")):
        for with_bias in (True, False):
            rules.extend(cls.rule(with_bias, conv_op).commute())
    return rules
