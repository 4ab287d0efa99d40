"""The arithmetic of weight pruning: 2-D weight views, masks, SparseGPT and pattern checks.

Every weight is handled as a matrix ``[outputs, reduction]`` whose rows are independent
dot products. The reduction axis is ordered so that N:M groups of consecutive columns are
the groups a sparse tensor core accelerates: K for MatMul ``B[K, N]`` and Gemm, and for a
Conv ``W[O, C, R, S]`` the input channels at each kernel position (columns ordered
``(r, s, c)``, c fastest), as NVIDIA's ASP and TensorRT lay out sparse convolutions.
"""

from __future__ import annotations

import numpy as np


def weight_rows(op_type: str, weight: np.ndarray, *, trans_b: bool = False) -> np.ndarray:
    """The ``[outputs, reduction]`` view of a MatMul/Gemm/Conv weight (a copy)."""
    if op_type == "Conv":
        out = weight.shape[0]
        return np.ascontiguousarray(weight.transpose(0, *range(2, weight.ndim), 1).reshape(out, -1))
    if op_type == "Gemm" and trans_b:
        return np.array(weight)
    return np.ascontiguousarray(weight.T)


def weight_from_rows(op_type: str, rows: np.ndarray, shape: tuple[int, ...], *, trans_b: bool = False) -> np.ndarray:
    """Invert :func:`weight_rows`: the weight of ``shape`` whose view is ``rows``."""
    if op_type == "Conv":
        kernel = shape[2:]
        moved = rows.reshape(shape[0], *kernel, shape[1])
        return np.ascontiguousarray(moved.transpose(0, len(shape) - 1, *range(1, len(shape) - 1)))
    if op_type == "Gemm" and trans_b:
        return np.array(rows)
    return np.ascontiguousarray(rows.T)


def nm_groups_fit(op_type: str, shape: tuple[int, ...], m: int, *, trans_b: bool = False) -> bool:
    """Whether the reduction axis splits into whole groups of ``m`` (a Conv needs C % m == 0)."""
    if op_type == "Conv":
        return shape[1] % m == 0
    reduction = shape[1] if op_type == "Gemm" and trans_b else shape[0]
    return reduction % m == 0


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask that keeps the ``n`` highest scores of every ``m`` consecutive columns."""
    rows, cols = scores.shape
    grouped = scores.reshape(rows, cols // m, m)
    # Stable sort: among equal scores the earlier column is pruned, deterministically.
    order = np.argsort(grouped, axis=-1, kind="stable")
    keep = np.ones_like(grouped, dtype=bool)
    np.put_along_axis(keep, order[..., : m - n], False, axis=-1)
    return keep.reshape(rows, cols)


def unstructured_mask(scores: np.ndarray, sparsity: float, *, per_row: bool) -> np.ndarray:
    """Keep-mask that drops the lowest ``sparsity`` fraction of scores (per row or per matrix)."""
    if per_row:
        count = int(np.floor(sparsity * scores.shape[1]))
        order = np.argsort(scores, axis=1, kind="stable")
        keep = np.ones_like(scores, dtype=bool)
        np.put_along_axis(keep, order[:, :count], False, axis=1)
        return keep
    count = int(np.floor(sparsity * scores.size))
    keep = np.ones(scores.size, dtype=bool)
    keep[np.argsort(scores, axis=None, kind="stable")[:count]] = False
    return keep.reshape(scores.shape)


def nm_satisfied(rows: np.ndarray, n: int, m: int) -> bool:
    """Whether every group of ``m`` consecutive columns holds at most ``n`` non-zeros."""
    if rows.shape[1] % m:
        return False
    nonzero = (rows != 0).reshape(rows.shape[0], -1, m).sum(axis=-1)
    return bool(np.all(nonzero <= n))


def unstructured_satisfied(rows: np.ndarray, sparsity: float, *, per_row: bool) -> bool:
    """Whether ``rows`` already has the zeros the target asks for."""
    zeros = rows == 0
    if per_row:
        return bool(np.all(zeros.sum(axis=1) >= int(np.floor(sparsity * rows.shape[1]))))
    return int(zeros.sum()) >= int(np.floor(sparsity * rows.size))


def sparsegpt(
    rows: np.ndarray,
    hessian: np.ndarray,
    *,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
) -> np.ndarray:
    """Prune ``rows`` [out, red] with SparseGPT, updating kept weights to compensate.

    Columns are pruned left to right; the error of each pruned column is spread over the
    columns not yet visited through the inverse Hessian ``(X^T X + damp)^-1``, which keeps
    ``X @ W^T`` close to the dense result on the calibration inputs (Frantar & Alistarh,
    2023). With ``n`` and ``m`` set, each group of ``m`` columns keeps ``n`` weights;
    otherwise ``sparsity`` of every block of columns is pruned.
    """
    weights = rows.astype(np.float64)
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    weights[:, dead] = 0.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    h_inv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    cols = weights.shape[1]
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        errors = _sparsegpt_block(weights, h_inv, start, end, sparsity=sparsity, n=n, m=m)
        weights[:, end:] -= errors @ h_inv[start:end, end:]
    return weights.astype(rows.dtype)


def _sparsegpt_block(
    weights: np.ndarray, h_inv: np.ndarray, start: int, end: int, *, sparsity: float, n: int, m: int
) -> np.ndarray:
    """Prune columns ``start:end`` of ``weights`` in place; return their scaled errors."""
    block = weights[:, start:end].copy()
    h_block = h_inv[start:end, start:end]
    diag = np.diag(h_block)
    prune = np.zeros_like(block, dtype=bool)
    if not m:
        saliency = block**2 / diag[None, :] ** 2
        count = int(sparsity * saliency.size)
        if count:
            threshold = np.sort(saliency, axis=None)[count - 1]
            prune = saliency <= threshold
    errors = np.zeros_like(block)
    for i in range(end - start):
        if m and i % m == 0:
            saliency = block[:, i : i + m] ** 2 / diag[None, i : i + m] ** 2
            order = np.argsort(saliency, axis=1, kind="stable")[:, : m - n]
            np.put_along_axis(prune[:, i : i + m], order, True, axis=1)
        column = block[:, i]
        quantized = np.where(prune[:, i], 0.0, column)
        error = (column - quantized) / diag[i]
        block[:, i:] -= np.outer(error, h_block[i, i:])
        block[:, i] = quantized
        errors[:, i] = error
    weights[:, start:end] = block
    return errors
