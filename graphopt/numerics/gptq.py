"""GPTQ's column-by-column rounding (Frantar et al., 2022), shared by ``quantize`` (int8) and ``weight_only``.

GPTQ quantizes a layer's input rows one at a time and spreads each row's rounding error over the
rows not yet quantized, weighted by the inverse Hessian of the layer's reconstruction error
``H = X^T X / n``. The scales are fixed before the update (GPTQ's ``static_groups``), so the
caller's format (per-channel int8, int4 blocks, NF4) keeps its layout: a :class:`Grid` snaps
a row onto them. Rows go in act-order (decreasing ``diag(H)``) when asked.
"""

from __future__ import annotations

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
    h = np.array(hessian, dtype=np.float32)
    diagonal = np.diag_indices(len(h))
    # An input that calibration never saw active carries no information: weigh it like a unit input.
    dead = h[diagonal] <= 0
    h[diagonal[0][dead], diagonal[1][dead]] = 1.0
    mean = float(np.mean(h[diagonal]))
    for attempt in range(_DAMP_RETRIES):
        damped = h.copy()
        damped[diagonal] += np.float32(damp * (10.0**attempt) * mean)
        try:
            inverse = np.linalg.inv(damped)
            return np.linalg.cholesky((inverse + inverse.T) / 2).T
        except np.linalg.LinAlgError:
            continue
    return None


def act_order(hessian: np.ndarray) -> np.ndarray:
    """Rows by decreasing ``diag(H)`` (GPTQ's act-order): the inputs that carry the most energy go first, while
    the most rows are left to absorb their error."""
    return np.argsort(-np.diag(hessian), kind="stable")


def gptq(w: np.ndarray, u: np.ndarray, grid: Grid, order: np.ndarray | None = None) -> np.ndarray:
    """GPTQ-quantize ``w [K, N]`` onto ``grid`` given ``U`` of :func:`inverse_cholesky`; the rounded weight.

    With ``order`` (a permutation of the rows), rows are quantized in that order and ``u`` must come from the
    Hessian permuted the same way; each row still snaps onto its own block's scale (static groups)."""
    work = np.array(w if order is None else w[order], dtype=np.float32)
    rows_of = np.arange(len(work)) if order is None else order
    rounded = np.empty_like(work)
    k = len(work)
    for start in range(0, k, _LAZY_BATCH):
        end = min(start + _LAZY_BATCH, k)
        rows = work[start:end].copy()
        errors = np.empty_like(rows)
        for i in range(end - start):
            row = start + i
            rounded[row] = grid.snap(int(rows_of[row]), rows[i])
            errors[i] = (rows[i] - rounded[row]) / u[row, row]
            rows[i + 1 :] -= np.outer(u[row, row + 1 : end], errors[i])
        # Rows after this lazy batch receive its accumulated update in one product.
        work[end:] -= u[start:end, end:].T @ errors
    if order is None:
        return rounded
    unpermuted = np.empty_like(rounded)
    unpermuted[order] = rounded
    return unpermuted


def output_error(w: np.ndarray, approx: np.ndarray | float, hessian: np.ndarray) -> float:
    """The layer's mean squared output error ``tr(D^T H D)`` for ``D = w - approx`` (``approx`` 0: the energy of the
    layer's own output, ``tr(W^T H W)``)."""
    d = np.asarray(w, dtype=np.float32) - approx
    return float(np.einsum("kn,kn->", hessian @ d, d, dtype=np.float64))


def prepare(hessian: np.ndarray, damp: float, ordered: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The row order (None: as stored) and the matching ``U`` of :func:`inverse_cholesky` for one layer input."""
    order = act_order(hessian) if ordered else None
    permuted = hessian if order is None else hessian[np.ix_(order, order)]
    return order, inverse_cholesky(permuted, damp)
