"""Exact rewrite rules on data layout that onnxscript's rule library lacks.

Found on the real-model corpus, where onnxslim or onnxsim removed nodes fold kept:

- ``Slice(Slice(x))`` on different axes (YOLO's space-to-depth "Focus" stem) is one Slice;
- a Transpose that only moves size-1 axes keeps the element order, so a Reshape reading it can read
  its input instead (the ``[T, 1, B, H] -> [T, B, 1, H]`` after every ONNX LSTM/GRU).

Written with onnxscript's public pattern API; every rule checks what makes it exact.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern


def _ints(value: ir.Value | None) -> list[int] | None:
    """A constant integer tensor's values, flattened; None when not constant or not integer."""
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    if array.dtype.kind not in "iu":
        return None
    return [int(v) for v in array.reshape(-1)]


class SliceOfSlice(pattern.RewriteRuleClassBase):
    """``Slice(Slice(x, s1, e1, a1, t1), s2, e2, a2, t2)`` on disjoint axes: one Slice with both."""

    def pattern(self, op, x, s1, e1, a1, t1, s2, e2, a2, t2):  # type: ignore[no-untyped-def]
        inner = op.Slice(x, s1, e1, a1, t1, _outputs=["inner"])
        return op.Slice(inner, s2, e2, a2, t2)

    def check(self, context, x, s1, e1, a1, t1, s2, e2, a2, t2, inner, **_):  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        if self._merged(x, (s1, e1, a1, t1), (s2, e2, a2, t2)) is None:
            return result.fail("non-constant parameters, unknown rank, or overlapping axes")
        return result

    def rewrite(self, op, x, s1, e1, a1, t1, s2, e2, a2, t2, inner, **_):  # type: ignore[no-untyped-def]
        merged = self._merged(x, (s1, e1, a1, t1), (s2, e2, a2, t2))
        assert merged is not None
        return op.Slice(x, *(op.Constant(value=ir.tensor(np.array(v, dtype=np.int64))) for v in merged))

    @staticmethod
    def _merged(x: ir.Value, first: tuple[ir.Value, ...], second: tuple[ir.Value, ...]) -> list[list[int]] | None:
        if x.shape is None:
            return None
        rank = len(x.shape)
        parts = []
        for params in (first, second):
            starts, ends, axes, steps = (_ints(v) for v in params)
            if starts is None or ends is None or axes is None or steps is None:
                return None
            if not len(starts) == len(ends) == len(axes) == len(steps):
                return None
            if any(not -rank <= a < rank for a in axes):
                return None
            parts.append((starts, ends, [a % rank for a in axes], steps))
        (s1, e1, a1, t1), (s2, e2, a2, t2) = parts
        if set(a1) & set(a2) or len(set(a1)) != len(a1) or len(set(a2)) != len(a2):
            return None
        return [s1 + s2, e1 + e2, a1 + a2, t1 + t2]


class ReshapeOfUnitTranspose(pattern.RewriteRuleClassBase):
    """``Reshape(Transpose(x), shape)`` where the Transpose moves only size-1 axes: ``Reshape(x, shape)``.

    Moving axes of size 1 leaves the elements in memory order, and Reshape reads only that order,
    unless its target copies a dimension from its input (a 0 without ``allowzero``).
    """

    def pattern(self, op, x, target):  # type: ignore[no-untyped-def]
        moved = op.Transpose(x, _allow_other_attributes=True, _outputs=["moved"])
        return op.Reshape(moved, target, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x, target, moved, out, **_):  # type: ignore[no-untyped-def]
        result = pattern.MatchResult()
        dims = _ints(target)
        if dims is None or (0 in dims and out.producer().attributes.get_int("allowzero", 0) == 0):
            return result.fail("the target shape is not constant or copies an input dimension")
        if not _keeps_order(x, moved.producer()):
            return result.fail("the Transpose moves an axis whose size is not 1")
        return result

    def rewrite(self, op, x, target, out, **_):  # type: ignore[no-untyped-def]
        return op.Reshape(x, target, **out.producer().attributes)


def _keeps_order(x: ir.Value, transpose: ir.Node) -> bool:
    """Whether the permutation keeps every axis of size other than 1 in its order."""
    if x.shape is None:
        return False
    perm = transpose.attributes.get_ints("perm", None)
    rank = len(x.shape)
    perm = list(perm) if perm is not None else list(reversed(range(rank)))
    if sorted(perm) != list(range(rank)):
        return False
    kept = [axis for axis in perm if x.shape[axis] != 1]  # a symbolic dimension counts as not 1
    return kept == sorted(kept)


def layout_rules() -> list[pattern.RewriteRule]:
    """The rules of this module."""
    # The inner Slice or Transpose may have other readers: it stays until dead-code removal.
    return [SliceOfSlice.rule(remove_nodes=False), ReshapeOfUnitTranspose.rule(remove_nodes=False)]
