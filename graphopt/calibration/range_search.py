"""Choose a clipping range from a histogram: percentile, KL divergence (entropy) or MSE.

Each search reads a :class:`StreamingHistogram`. With ``symmetric=True`` the histogram holds
``|x|`` and the result is ``(-t, t)``; otherwise it holds ``x`` and the result is ``(lo, hi)``.
A result is never wider than the values seen. Candidate clipping points are bin edges and
every candidate is scored at once with prefix sums, so a search over 2048 bins takes
milliseconds, whatever the number of samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from graphopt.calibration.histogram import StreamingHistogram

# Probability given to a candidate bin that has none, so that KL(P||Q) stays finite but large.
_EPSILON = 1e-12
# At most this many (lo, hi) pairs per step of the asymmetric MSE search, and numbers per KL block.
_GRID = 1 << 18


@dataclass(frozen=True)
class _Bins:
    """The occupied part of a histogram: bin ``k`` is ``[(k - zero) * width, (k - zero + 1) * width)``."""

    counts: np.ndarray
    zero: int
    width: float
    vmin: float
    vmax: float


def _occupied(hist: StreamingHistogram) -> _Bins:
    """The bins from the first to the last non-empty one, stretched to reach the edge at 0."""
    nonzero = np.flatnonzero(hist.counts)
    zero = -hist.start  # the bins always cover 0, and 0 is a bin edge
    first, last = min(int(nonzero[0]), zero), max(int(nonzero[-1]) + 1, zero)
    return _Bins(hist.counts[first:last], zero - first, hist.bin_width, hist.min, hist.max)


def percentile_range(hist: StreamingHistogram, percentile: float, symmetric: bool) -> tuple[float, float]:
    """The ``percentile`` of ``|x|`` (symmetric), or the ``100 - percentile`` and ``percentile`` ones of ``x``."""
    bins = _occupied(hist)
    upper = _quantile(bins, percentile / 100.0)
    if symmetric:
        return -upper, upper
    return _quantile(bins, 1.0 - percentile / 100.0), upper


def _quantile(bins: _Bins, q: float) -> float:
    """The value below which a fraction ``q`` of the counts lies, uniform inside a bin."""
    cumulative = np.cumsum(bins.counts)
    target = q * cumulative[-1]
    if target <= 0.0:
        return bins.vmin
    k = min(int(np.searchsorted(cumulative, target, side="left")), bins.counts.size - 1)
    inside = (target - (cumulative[k] - bins.counts[k])) / bins.counts[k]
    return float(np.clip((k - bins.zero + inside) * bins.width, bins.vmin, bins.vmax))


def entropy_range(hist: StreamingHistogram, num_bits: int, symmetric: bool) -> tuple[float, float]:
    """The range whose quantized histogram is closest in KL divergence to the observed one (TensorRT)."""
    bins = _occupied(hist)
    if symmetric:
        # A signed symmetric quantizer spends 2**(bits-1) levels on |x| (TensorRT: 128 for int8).
        levels = 1 << (num_bits - 1)
        t = _kl_threshold(bins.counts[bins.zero :], bins.width, bins.vmax, lambda t: np.full(t.shape, levels))
        return -t, t
    below, above = -min(bins.vmin, 0.0), max(bins.vmax, 0.0)
    if below + above == 0.0:
        return bins.vmin, bins.vmax
    steps = (1 << num_bits) - 1

    def levels_on_magnitude(t: np.ndarray) -> np.ndarray:
        return np.rint(steps * t / (np.minimum(t, above) + np.minimum(t, below)))

    # As ORT does, search a threshold t on |x| and intersect [-t, t] with [min, max]: clipping
    # |x| at t is then exactly clipping x to that range. But where ORT plans 128 levels for
    # [0, t] whatever the data, we count those an asymmetric quantizer really spends there: all
    # 2**bits for a post-ReLU tensor, 128 only when both sides reach t. Splitting levels between
    # the sides by their observed extents instead would starve the bulk on one side whenever
    # the other has a far outlier.
    t = _kl_threshold(_folded(bins), bins.width, max(below, above), levels_on_magnitude)
    return max(-t, bins.vmin), min(t, bins.vmax)


def _folded(bins: _Bins) -> np.ndarray:
    """Counts of |x| from 0 outward; exact because 0 is a bin edge."""
    positive, negative = bins.counts[bins.zero :], bins.counts[: bins.zero][::-1]
    folded = np.zeros(max(positive.size, negative.size))
    folded[: positive.size] += positive
    folded[: negative.size] += negative
    return folded


def _kl_threshold(
    counts: np.ndarray, width: float, extreme: float, levels_of: Callable[[np.ndarray], np.ndarray]
) -> float:
    """Where to clip |x|, given its counts from 0 outward and the levels a threshold leaves for [0, t]."""
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return extreme
    counts = counts[: nonzero[-1] + 1]
    kept = np.arange(1, counts.size + 1)
    t = kept * width
    t[-1] = extreme
    levels = levels_of(t).astype(np.int64)
    # A candidate needs a bin per level at least; with every bin its own level, clipping cannot help.
    usable = kept >= levels
    if levels[-1] >= counts.size or not usable.any():
        return extreme
    kept, levels = kept[usable], levels[usable]
    tables = _KLTables.of(counts)
    divergence = np.empty(kept.size)
    for value in np.unique(levels):
        chosen = np.flatnonzero(levels == value)
        block = max(1, _GRID // (int(value) + 1))
        for start in range(0, chosen.size, block):
            part = chosen[start : start + block]
            divergence[part] = tables.divergences(kept[part], int(value))
    best = int(kept[np.argmin(divergence)])
    return extreme if best == counts.size else min(best * width, extreme)


@dataclass(frozen=True)
class _KLTables:
    """Prefix sums that make KL(P||Q) of one candidate threshold O(levels) instead of O(bins)."""

    counts: np.ndarray
    total: float
    cumulative: np.ndarray  # counts before bin k
    nonzero: np.ndarray  # non-empty bins before bin k
    xlogx: np.ndarray  # sum of c log c before bin k

    @classmethod
    def of(cls, counts: np.ndarray) -> _KLTables:
        def prefix(values: np.ndarray) -> np.ndarray:
            return np.concatenate(([0.0], np.cumsum(values)))

        return cls(counts, float(counts.sum()), prefix(counts), prefix(counts > 0), prefix(_xlogx(counts)))

    def divergences(self, kept: np.ndarray, levels: int) -> np.ndarray:
        """KL(P||Q) for each candidate ``kept``: P folds the outliers into the last kept bin, Q
        quantizes the kept bins to ``levels`` levels and spreads each level over its non-empty bins."""
        outliers = self.total - self.cumulative[kept]
        last = self.counts[kept - 1] + outliers
        entropy = (self.xlogx[kept - 1] + _xlogx(last)) / self.total - math.log(self.total)
        # Chunk j holds the bins a uniform quantizer over [0, t) maps to level j; TensorRT and ORT
        # cut equal chunks and give the remainder to the last one, the same when levels divide kept.
        bounds = -((-np.outer(kept, np.arange(levels + 1))) // levels)
        mass = self.cumulative[bounds[:, 1:]] - self.cumulative[bounds[:, :-1]]
        support = self.nonzero[bounds[:, 1:]] - self.nonzero[bounds[:, :-1]]
        # The last kept bin holds the outliers in P even when the histogram has none there.
        support[:, -1] += (self.counts[kept - 1] == 0) & (outliers > 0)
        p_mass = mass.copy()
        p_mass[:, -1] += outliers
        denominator = support * self.cumulative[kept][:, None]
        q = np.divide(mass, denominator, out=np.zeros_like(mass), where=(support > 0) & (mass > 0))
        cross = (p_mass * np.log(np.maximum(q, _EPSILON))).sum(axis=1) / self.total
        return entropy - cross


def _xlogx(values: np.ndarray) -> np.ndarray:
    return values * np.log(np.where(values > 0, values, 1.0))


def mse_range(hist: StreamingHistogram, num_bits: int, symmetric: bool) -> tuple[float, float]:
    """The range with the least expected squared error: rounding noise inside plus clipping outside."""
    bins = _occupied(hist)
    if symmetric:
        t = _mse_symmetric(bins, (1 << (num_bits - 1)) - 1)
        return -t, t
    return _mse_asymmetric(bins, (1 << num_bits) - 1)


def _tail_sums(counts: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, ...]:
    """Suffix sums (from bin k on) of c, c·u and c·(u² + 1/12), u a bin centre in bin widths."""
    moments = (counts, counts * centers, counts * (centers**2 + 1.0 / 12.0))
    return tuple(np.concatenate((np.cumsum(m[::-1])[::-1], [0.0])) for m in moments)


def _mse_symmetric(bins: _Bins, steps: int) -> float:
    """The threshold ``t`` minimising the error of a quantizer with ``steps`` steps over ``[0, t]``."""
    counts = bins.counts  # |x| from 0: bins.zero == 0
    n = counts.size
    t = np.arange(n + 1, dtype=np.float64)
    t[n] = bins.vmax / bins.width
    t0, t1, t2 = _tail_sums(counts, np.arange(n) + 0.5)
    clipped = np.maximum(t2 - 2.0 * t * t1 + t * t * t0, 0.0)
    inside = np.concatenate(([0.0], np.cumsum(counts)))
    error = inside * (t / steps) ** 2 / 12.0 + clipped
    best = int(np.argmin(error[1:])) + 1
    return bins.vmax if best == n else float(t[best] * bins.width)


def _mse_asymmetric(bins: _Bins, steps: int) -> tuple[float, float]:
    """The ``(lo, hi)`` minimising the error of a quantizer with ``steps`` steps over ``[lo, hi] ∋ 0``."""
    counts, zero, width = bins.counts, bins.zero, bins.width
    n = counts.size
    centers = np.arange(n) - zero + 0.5
    # Candidates in bin widths: lo on an edge at or below 0, hi on one at or above; the outer
    # ones are the exact extremes (or 0, which the quantizer includes anyway).
    lo = np.arange(zero + 1, dtype=np.float64) - zero
    lo[0] = min(bins.vmin, 0.0) / width
    hi = np.arange(zero, n + 1, dtype=np.float64) - zero
    hi[-1] = max(bins.vmax, 0.0) / width
    u0, u1, u2 = (s[zero:] for s in _tail_sums(counts, centers))
    l0, l1, l2 = (s[0] - s[: zero + 1] for s in _tail_sums(counts, centers))
    upper = np.maximum(u2 - 2.0 * hi * u1 + hi * hi * u0, 0.0)
    lower = np.maximum(l2 - 2.0 * lo * l1 + lo * lo * l0, 0.0)
    cumulative = np.concatenate(([0.0], np.cumsum(counts)))

    def error(j: np.ndarray, k: np.ndarray) -> np.ndarray:
        inside = cumulative[k + zero] - cumulative[j]
        return lower[j] + upper[k] + inside * ((hi[k] - lo[j]) / steps) ** 2 / 12.0

    j, k = _grid_argmin(error, lo.size, hi.size)
    return (bins.vmin if j == 0 else float(lo[j] * width)), (bins.vmax if k == hi.size - 1 else float(hi[k] * width))


def _grid_argmin(error: Callable[[np.ndarray, np.ndarray], np.ndarray], nj: int, nk: int) -> tuple[int, int]:
    """The ``(j, k)`` minimising ``error`` on a coarse grid, then refined around the best point."""

    def best(js: np.ndarray, ks: np.ndarray) -> tuple[int, int]:
        values = error(js[:, None], ks[None, :])
        a, b = np.unravel_index(int(np.argmin(values)), values.shape)
        return int(js[a]), int(ks[b])

    stride = max(1, math.ceil(math.sqrt(nj * nk / _GRID)))
    j, k = best(_strided(0, nj, stride), _strided(0, nk, stride))
    if stride > 1:
        j, k = best(_strided(j - stride, j + stride + 1, 1, nj), _strided(k - stride, k + stride + 1, 1, nk))
    return j, k


def _strided(start: int, stop: int, stride: int, size: int | None = None) -> np.ndarray:
    """Every ``stride``-th index of ``[start, stop)`` within ``[0, size)``, always with the last one."""
    size = stop if size is None else size
    start, stop = max(start, 0), min(stop, size)
    return np.unique(np.append(np.arange(start, stop, stride), stop - 1))
