"""A histogram of a stream of values whose memory does not depend on how many it has seen.

The histogram keeps a fixed number of equal bins. Bin edges sit on integer multiples of a
power-of-two width ``w`` and the bins always cover 0, because a quantizer's range always
includes 0 and a finer grid there would be wasted. When a batch falls outside the bins, the
width is doubled (each new bin is the exact union of two old ones, TensorRT and PyTorch's
HistogramObserver grow the same way) until every value seen fits. As every value always lands
in bin ``floor(x / w)`` and merging is exact, the counts do not depend on how the stream was
cut into batches: many small batches give the same histogram as one large one.
"""

from __future__ import annotations

import math

import numpy as np


class StreamingHistogram:
    """Counts of finite values in ``bins`` equal bins that grow to cover everything seen.

    Attributes:
        counts: ``bins`` counts (float64, exact up to 2**53 values); bin ``i`` is
            ``[(start + i) * bin_width, (start + i + 1) * bin_width)``.
        start: Index of the first bin on the grid of multiples of ``bin_width``.
        exponent: ``bin_width == 2.0 ** exponent``.
        min, max: The exact smallest and largest value seen (``inf``/``-inf`` before any).
    """

    # The narrowest bins: far below any float32 activation, yet x / w stays finite in float64.
    MIN_EXPONENT = -160

    def __init__(self, bins: int) -> None:
        self.counts = np.zeros(bins, dtype=np.float64)
        self.start = 0
        self.exponent = self.MIN_EXPONENT
        self.min = math.inf
        self.max = -math.inf

    @property
    def bins(self) -> int:
        """The number of bins."""
        return self.counts.size

    @property
    def bin_width(self) -> float:
        """The width of every bin."""
        return math.ldexp(1.0, self.exponent)

    @property
    def total(self) -> float:
        """How many values were counted."""
        return float(self.counts.sum())

    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges."""
        return (self.start + np.arange(self.bins + 1, dtype=np.float64)) * self.bin_width

    def update(self, values: np.ndarray) -> None:
        """Count ``values`` (finite float64, any shape), widening the bins first if needed."""
        values = values.ravel()
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        self.min, self.max = min(self.min, low), max(self.max, high)
        self._cover(min(self.min, 0.0), max(self.max, 0.0))
        # x * 2**-e is exact, so a value's bin never depends on the batch it came in.
        index = np.floor(values * math.ldexp(1.0, -self.exponent)).astype(np.int64)
        index -= self.start
        self.counts += np.bincount(index, minlength=self.bins)

    def _cover(self, low: float, high: float) -> None:
        """Widen (by a power of two) and shift the bins so they hold ``[low, high]``."""
        exponent = max(self.exponent, self._fitting_exponent(low, high))
        # Old bins sit within a few thousand bins of 0, so a larger factor maps them alike.
        factor = 1 << min(exponent - self.exponent, 62)
        width = math.ldexp(1.0, exponent)
        start = math.floor(low / width)
        if factor == 1 and start == self.start:
            return
        # Each old bin lies inside exactly one new bin, so re-binning loses nothing.
        old = (self.start + np.arange(self.bins)) // factor - start
        occupied = self.counts > 0
        merged = np.bincount(old[occupied], weights=self.counts[occupied], minlength=self.bins)
        self.counts, self.start, self.exponent = merged, start, exponent

    def _fitting_exponent(self, low: float, high: float) -> int:
        """The smallest exponent whose bins hold ``[low, high]``, given the bin count."""
        span = high - low
        if span <= 0.0:
            return self.MIN_EXPONENT
        exponent = max(self.MIN_EXPONENT, math.ceil(math.log2(span / self.bins)))
        while not self._fits(low, high, exponent):
            exponent += 1
        while exponent > self.MIN_EXPONENT and self._fits(low, high, exponent - 1):
            exponent -= 1
        return exponent

    def _fits(self, low: float, high: float, exponent: int) -> bool:
        width = math.ldexp(1.0, exponent)
        return math.floor(high / width) - math.floor(low / width) < self.bins
