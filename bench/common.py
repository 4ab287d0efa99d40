"""Measurements every bench script takes the same way."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import numpy as np


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity of each sample (axis 0) of ``candidate`` to ``reference``."""
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = candidate.reshape(len(candidate), -1).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def reset_peak_rss_mb() -> float:
    """Restart this process's peak-RSS count (Linux: /proc/self/clear_refs); returns the RSS now, in MB."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak RSS since :func:`reset_peak_rss_mb` (VmHWM), in MB."""
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return float(line.split()[1]) / 1024.0
    return rss_mb()


def rss_mb() -> float:
    """This process's peak resident memory so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
