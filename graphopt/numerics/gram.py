"""Streamed Gram matrices ``X^T X`` (and ``X^T Y``): what GPTQ's Hessians and pruning's statistics sum."""

from __future__ import annotations

import numpy as np


class GramAccumulator:
    """Sums ``X^T X`` (and ``X^T Y``) over batches of rows into float64.

    Rows are buffered up to ``block_rows`` so that each product is one large BLAS call
    instead of one per small batch (a sentence is a dozen tokens); the buffer never needs
    to outgrow the sum itself. ``product_dtype`` is the dtype of each block's product:
    float64 for least-squares reconstruction, float32 where speed matters more (GPTQ).
    """

    def __init__(self, block_rows: int = 4096, product_dtype: type = np.float64, sum_dtype: type = np.float64) -> None:
        self.block_rows = block_rows
        self.product_dtype = product_dtype
        self.sum_dtype = sum_dtype
        self.xtx: np.ndarray | None = None
        self.xty: np.ndarray | None = None
        self.rows = 0
        self._x: list[np.ndarray] = []
        self._y: list[np.ndarray] = []
        self._buffered = 0

    def add(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        self._x.append(x)
        if y is not None:
            self._y.append(y)
        self._buffered += len(x)
        self.rows += len(x)
        if self._buffered >= self.block_rows:
            self.flush()

    def flush(self) -> None:
        if not self._x:
            return
        x = np.concatenate(self._x).astype(self.product_dtype)
        xtx = (x.T @ x).astype(self.sum_dtype, copy=False)
        if self.xtx is None:
            self.xtx = xtx
        else:
            self.xtx += xtx  # in place: no second K x K sum alive
        if self._y:
            xty = (x.T @ np.concatenate(self._y).astype(self.product_dtype)).astype(self.sum_dtype, copy=False)
            if self.xty is None:
                self.xty = xty
            else:
                self.xty += xty
        self._x, self._y, self._buffered = [], [], 0

    def mean(self) -> np.ndarray:
        """``X^T X / n`` in float32 (zeros of the right size are not known before any row: call after adding)."""
        self.flush()
        total = self.xtx if self.xtx is not None else np.zeros((0, 0))
        return (total / max(self.rows, 1)).astype(np.float32)
