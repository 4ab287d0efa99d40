"""GPTQ's column-by-column rounding (Frantar et al., 2022), shared by ``quantize`` (int8) and ``weight_only``.

GPTQ quantizes a layer's input rows one at a time and spreads each row's rounding error over the
rows not yet quantized, weighted by the inverse Hessian of the layer's reconstruction error
``H = X^T X / n``. The scales are fixed before the update (GPTQ's ``static_groups``), so the
caller's format (per-channel int8, int4 blocks, NF4) keeps its layout: a :class:`Grid` snaps
a row onto them. Rows go in act-order (decreasing ``diag(H)``) when asked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

_LAZY_BATCH = 128  # rows updated together before the rest of the weight is touched (GPTQ's lazy batch)
_DAMP_RETRIES = 4


class Grid(Protocol):
    """A quantized weight whose scales are fixed: rows can be snapped onto it and codes re-derived."""

    def snap(self, row: int, values: np.ndarray) -> np.ndarray: ...

    def encode(self, w: np.ndarray) -> Grid: ...

    def dequantize(self) -> np.ndarray: ...


def inverse_cholesky(hessian: np.ndarray, damp: float) -> np.ndarray | None:
    """Upper ``U`` with ``U^T U = (H + damp * mean(diag H) * I)^-1``; None if H stays singular."""
    u, ok = inverse_cholesky_stack(np.asarray(hessian)[None], damp)
    return u[0] if ok[0] else None


def inverse_cholesky_stack(hessians: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """:func:`inverse_cholesky` of each ``H [B, S, S]`` at once: ``(U [B, S, S], ok [B])``, where a block whose
    Hessian stays singular has ``ok`` False (and an identity ``U``)."""
    h = np.array(hessians, dtype=np.float32)
    index = np.arange(h.shape[-1])
    # An input that calibration never saw active carries no information: weigh it like a unit input.
    diagonal = h[:, index, index]
    diagonal[diagonal <= 0] = 1.0
    h[:, index, index] = diagonal
    mean = diagonal.mean(axis=1)
    try:  # one LAPACK call per block either way; the stack only saves Python's overhead
        return _inverse_cholesky(h, index, damp * mean), np.ones(len(h), bool)
    except np.linalg.LinAlgError:
        pass
    u, ok = np.broadcast_to(np.eye(len(index), dtype=np.float32), h.shape).copy(), np.zeros(len(h), bool)
    for b in range(len(h)):
        for attempt in range(_DAMP_RETRIES):
            try:
                u[b] = _inverse_cholesky(h[b : b + 1], index, damp * (10.0**attempt) * mean[b : b + 1])[0]
            except np.linalg.LinAlgError:
                continue
            ok[b] = True
            break
    return u, ok


def _inverse_cholesky(h: np.ndarray, index: np.ndarray, added: np.ndarray) -> np.ndarray:
    damped = h.copy()
    damped[:, index, index] += added.astype(np.float32)[:, None]
    inverse = np.linalg.inv(damped)
    return np.linalg.cholesky((inverse + inverse.transpose(0, 2, 1)) / 2).transpose(0, 2, 1)


def gptq(w: np.ndarray, u: np.ndarray, grid: Grid, order: np.ndarray | None = None) -> np.ndarray:
    """GPTQ-quantize ``w [K, N]`` onto ``grid`` given ``U`` of :func:`inverse_cholesky`; the rounded weight.

    With ``order`` (a permutation of the rows), rows are quantized in that order and ``u`` must come from the
    Hessian permuted the same way; each row still snaps onto its own block's scale (static groups)."""
    rows_of = np.arange(len(w)) if order is None else order
    work = np.asarray(w if order is None else w[order], dtype=np.float32)
    rounded = gptq_stack(work[None], np.asarray(u)[None], lambda i, v: grid.snap(int(rows_of[i]), v[0])[None])[0]
    if order is None:
        return rounded
    unpermuted = np.empty_like(rounded)
    unpermuted[order] = rounded
    return unpermuted


def gptq_stack(w: np.ndarray, u: np.ndarray, snap: Callable[[int, np.ndarray], np.ndarray]) -> np.ndarray:
    """:func:`gptq` of ``B`` independent problems at once (a grouped conv's groups, a weight's Hessian blocks):
    ``w [B, S, N]`` with its ``U [B, S, S]``, rows in the order given; ``snap(i, values [B, N])`` puts row ``i``
    of every problem on its grid. The rounded ``[B, S, N]``."""
    work = np.array(w, dtype=np.float32)
    rounded = np.empty_like(work)
    k = work.shape[1]
    for start in range(0, k, _LAZY_BATCH):
        end = min(start + _LAZY_BATCH, k)
        rows = work[:, start:end].copy()
        errors = np.empty_like(rows)
        for i in range(end - start):
            row = start + i
            rounded[:, row] = snap(row, rows[:, i])
            errors[:, i] = (rows[:, i] - rounded[:, row]) / u[:, row, row, None]
            rows[:, i + 1 :] -= u[:, row, row + 1 : end, None] * errors[:, i, None, :]
        # Rows after this lazy batch receive its accumulated update in one product.
        work[:, end:] -= np.matmul(u[:, start:end, end:].transpose(0, 2, 1), errors)
    return rounded


def output_error(w: np.ndarray, approx: np.ndarray | float, hessian: np.ndarray) -> float:
    """The layer's mean squared output error ``tr(D^T H D)`` for ``D = w - approx`` (``approx`` 0: the energy of the
    layer's own output, ``tr(W^T H W)``)."""
    d = np.asarray(w, dtype=np.float32) - approx
    return float(output_error_stack(d[None], 0.0, np.asarray(hessian)[None])[0])


def output_error_stack(w: np.ndarray, approx: np.ndarray | float, hessians: np.ndarray) -> np.ndarray:
    """:func:`output_error` of each of ``B`` problems: ``w``, ``approx`` ``[B, S, N]``, ``hessians [B, S, S]``."""
    d = np.asarray(w, dtype=np.float32) - approx
    return np.einsum("bkn,bkn->b", np.matmul(hessians, d), d, dtype=np.float64)


def prepare(hessian: np.ndarray, damp: float, ordered: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The row order (None: as stored) and the matching ``U`` of :func:`inverse_cholesky` for one layer input."""
    if not ordered:
        return None, inverse_cholesky(hessian, damp)
    order, u, ok = prepare_stack(np.asarray(hessian)[None], damp)
    return order[0], u[0] if ok[0] else None


def prepare_stack(hessians: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`prepare` in act-order (decreasing ``diag(H)``: the inputs that carry the most energy go first, while
    the most rows are left to absorb their error) for each ``H [B, S, S]``: ``(order [B, S], U [B, S, S], ok
    [B])``."""
    index = np.arange(hessians.shape[-1])
    order = np.argsort(-hessians[:, index, index], axis=1, kind="stable")
    permuted = np.take_along_axis(np.take_along_axis(hessians, order[:, :, None], axis=1), order[:, None, :], axis=2)
    u, ok = inverse_cholesky_stack(permuted, damp)
    return order, u, ok
