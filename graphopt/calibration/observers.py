"""Activation-range observers: they choose the clipping range (hence the scale) of static quantization.

An observer sees every batch of one tensor and reduces it at once, so memory does not grow
with the number of samples: ``minmax`` keeps two floats, the other methods one histogram of
``ObserverConfig.bins`` bins (see :mod:`graphopt.calibration.histogram`), which is what lets
them calibrate a BERT-sized model where ONNX Runtime's percentile calibrator, which keeps
every value, needs over 100 GB. :func:`observe_ranges` streams a model's activations through
ONNX Runtime into one observer per tensor.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import onnx_ir as ir

from graphopt.calibration import range_search
from graphopt.calibration.collect import stream_activations
from graphopt.calibration.histogram import StreamingHistogram
from graphopt.calibration.sources import DataSpec

logger = logging.getLogger(__name__)

Method = Literal["minmax", "percentile", "entropy", "mse"]
METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")


@dataclass(frozen=True)
class ObserverConfig:
    """How to choose the clipping range of an activation from calibration data."""

    method: Method = field(
        default="minmax",
        metadata={
            "help": "minmax: smallest and largest value; percentile: clip the extreme percentiles; "
            "entropy: least KL divergence after quantization (TensorRT); mse: least quantization MSE."
        },
    )
    percentile: float = field(
        default=99.999,
        metadata={"help": "For method percentile: keep values up to this percentile (of |x| when symmetric)."},
    )
    moving_average: float | None = field(
        default=None,
        metadata={
            "help": "For method minmax: average the per-batch min/max with this constant (as PyTorch's "
            "MovingAverageMinMaxObserver) instead of taking the global ones."
        },
    )
    bins: int = field(default=2048, metadata={"help": "Histogram bins of the percentile, entropy and mse methods."})
    symmetric: bool = field(
        default=False,
        metadata={"help": "The range is for a symmetric quantizer: search and clip on |x|, return (-t, t)."},
    )
    num_bits: int = field(default=8, metadata={"help": "Bits of the quantizer the entropy and mse methods plan for."})
    unsigned: bool = field(
        default=True,
        metadata={
            "help": "The quantizer is uint8-style (zero point in [0, 2**bits - 1]) rather than int8-style. "
            "Both have the same levels, so the range does not change; it tells the quantizer."
        },
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"ObserverConfig.method must be one of {', '.join(map(repr, METHODS))}; got {self.method!r}."
            )
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"ObserverConfig.percentile must be in (0, 100], e.g. 99.99; got {self.percentile!r}.")
        if self.method == "percentile" and not self.symmetric and self.percentile < 50.0:
            raise ValueError(
                "ObserverConfig.percentile must be at least 50 for an asymmetric range, which keeps the values "
                f"between percentiles 100 - p and p; got {self.percentile!r}. Or set symmetric=True to clip |x|."
            )
        if not _is_int(self.bins) or self.bins < 128:
            raise ValueError(f"ObserverConfig.bins must be an integer >= 128; got {self.bins!r}.")
        if not _is_int(self.num_bits) or not 2 <= self.num_bits <= 16:
            raise ValueError(f"ObserverConfig.num_bits must be an integer in 2..16; got {self.num_bits!r}.")
        if self.moving_average is not None:
            if not 0.0 < self.moving_average < 1.0:
                raise ValueError(
                    f"ObserverConfig.moving_average must be None or in (0, 1), e.g. 0.01; got {self.moving_average!r}."
                )
            if self.method != "minmax":
                raise ValueError(
                    f"ObserverConfig.moving_average applies to method 'minmax' only; got method {self.method!r}. "
                    "Remove moving_average or use method='minmax'."
                )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Observer(Protocol):
    """Reduces the batches of one tensor to a clipping range ``(rmin, rmax)``.

    The range need not contain 0 (a tensor of values in [3, 5] gives (3, 5)): the quantizer
    widens it to include 0 itself. A symmetric observer returns ``(-t, t)``. An observer that
    saw no finite value returns ``(0.0, 0.0)``; NaN and infinities are ignored.
    """

    def update(self, x: np.ndarray) -> None:
        """Take one batch of the tensor into account; the array is not kept."""
        ...

    def range(self) -> tuple[float, float]:
        """The clipping range chosen from everything seen so far."""
        ...


class _FiniteValues:
    """Drops NaN and infinities from batches, counts them and logs the first occurrence."""

    def __init__(self, config: ObserverConfig, name: str) -> None:
        self.config = config
        self.name = name
        self.nonfinite = 0

    def _finite(self, x: np.ndarray) -> np.ndarray:
        values = np.asarray(x).ravel()
        if not np.issubdtype(values.dtype, np.floating):
            return values.astype(np.float64)
        finite = np.isfinite(values)
        if finite.all():
            return values
        dropped = int(values.size - np.count_nonzero(finite))
        if self.nonfinite == 0:
            logger.debug(
                "%s: ignoring %d NaN/inf value(s); later ones are only counted", self.name or "observer", dropped
            )
        self.nonfinite += dropped
        return values[finite]


class MinMaxObserver(_FiniteValues):
    """The smallest and largest value seen, or moving averages of the per-batch ones."""

    def __init__(self, config: ObserverConfig, name: str = "") -> None:
        super().__init__(config, name)
        self.min = math.inf
        self.max = -math.inf

    def update(self, x: np.ndarray) -> None:
        """Take one batch of the tensor into account; the array is not kept."""
        values = self._finite(x)
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        average = self.config.moving_average
        if average is None or self.min > self.max:  # global extremes, or the first batch of an average
            self.min, self.max = min(self.min, low), max(self.max, high)
        else:
            self.min += average * (low - self.min)
            self.max += average * (high - self.max)

    def range(self) -> tuple[float, float]:
        """The clipping range chosen from everything seen so far."""
        if self.min > self.max:
            return 0.0, 0.0
        if self.config.symmetric:
            t = max(abs(self.min), abs(self.max))
            return -t, t
        return self.min, self.max


class HistogramObserver(_FiniteValues):
    """A percentile, entropy or MSE range read from a fixed-size histogram (of |x| when symmetric)."""

    def __init__(self, config: ObserverConfig, name: str = "") -> None:
        super().__init__(config, name)
        self.histogram = StreamingHistogram(config.bins)

    def update(self, x: np.ndarray) -> None:
        """Take one batch of the tensor into account; the array is not kept."""
        values = self._finite(x).astype(np.float64, copy=False)
        self.histogram.update(np.abs(values) if self.config.symmetric else values)

    def range(self) -> tuple[float, float]:
        """The clipping range chosen from everything seen so far."""
        config, hist = self.config, self.histogram
        if hist.total == 0:
            return 0.0, 0.0
        if config.method == "percentile":
            return range_search.percentile_range(hist, config.percentile, config.symmetric)
        if config.method == "entropy":
            return range_search.entropy_range(hist, config.num_bits, config.symmetric)
        return range_search.mse_range(hist, config.num_bits, config.symmetric)


def make_observer(config: ObserverConfig, *, name: str = "") -> MinMaxObserver | HistogramObserver:
    """A fresh observer for ``config``; ``name`` (the tensor's) only labels its log lines."""
    if config.method == "minmax":
        return MinMaxObserver(config, name)
    return HistogramObserver(config, name)


def observe_ranges(
    model: ir.Model,
    data: DataSpec,
    names: Sequence[str],
    config: ObserverConfig | Mapping[str, ObserverConfig],
    *,
    device: str = "cpu",
    group_size: int | None = None,
    threads: int | None = None,
    also: Callable[[str, np.ndarray], None] | None = None,
) -> dict[str, tuple[float, float]]:
    """Run ``model`` on ``data`` and return the clipping range of each tensor in ``names``.

    Args:
        model: The model as it is now (it is not modified).
        data: Calibration inputs.
        names: Tensors to observe: graph inputs or node outputs of the main graph.
        config: One config for every tensor, or one per tensor name.
        device: ONNX Runtime device.
        group_size: At most this many tensors per pass over the data (None: all at once).
        threads: ONNX Runtime intra-op threads.
        also: Another consumer that sees every batch of every tensor (e.g. per-channel bounds).

    Returns:
        ``{name: (rmin, rmax)}``, see :class:`Observer` for what a range means.
    """
    names = list(dict.fromkeys(names))
    if isinstance(config, Mapping):
        missing = [name for name in names if name not in config]
        if missing:
            raise ValueError(f"no ObserverConfig for tensor(s) {missing}; give one per tensor or a single config.")
    observers = {
        name: make_observer(config[name] if isinstance(config, Mapping) else config, name=name) for name in names
    }

    def consume(name: str, array: np.ndarray) -> None:
        observers[name].update(array)
        if also is not None:
            also(name, array)

    stream_activations(model, data, names, consume, device=device, group_size=group_size, threads=threads)
    return {name: observer.range() for name, observer in observers.items()}
