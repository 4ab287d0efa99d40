"""PNG plots of a report: per-layer error, size breakdown, latency (needs matplotlib)."""

from __future__ import annotations

import logging
from pathlib import Path

from graphopt.report import Report

logger = logging.getLogger(__name__)

# The files write_plots may write: --report-dir checks them against the run's inputs before it starts.
PLOT_NAMES = ("size.png", "layer_errors.png", "latency.png")


def write_plots(report: Report, folder: Path) -> list[Path]:
    """Write the plots the report has data for; returns their paths (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no PNG plots (pip install matplotlib)")
        return []
    sizes, layers, latency = (folder / name for name in PLOT_NAMES)
    written = [_sizes(plt, report, sizes)]
    if report.layers:
        written.append(_layers(plt, report, layers))
    if report.latency:
        written.append(_latency(plt, report, latency))
    return written


def _sizes(plt: object, report: Report, path: Path) -> Path:
    dtypes = sorted(set(report.before.bytes_by_dtype) | set(report.after.bytes_by_dtype))
    fig, ax = plt.subplots(figsize=(6, 3.5))  # type: ignore[attr-defined]
    bottom = [0.0, 0.0]
    for dtype in dtypes:
        values = [report.before.bytes_by_dtype.get(dtype, 0) / 2**20, report.after.bytes_by_dtype.get(dtype, 0) / 2**20]
        ax.bar(["input", "optimized"], values, bottom=bottom, label=dtype)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("weights (MiB)")
    ax.set_title("weight bytes by dtype")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # type: ignore[attr-defined]
    return path


def _layers(plt: object, report: Report, path: Path) -> Path:
    rows = [r for r in (report.layers or []) if r["sqnr_db"] != float("inf")][:30]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.25 * len(rows) + 1)))  # type: ignore[attr-defined]
    ax.barh([f"{r['tensor']} ({r['op_type']})" for r in rows][::-1], [r["sqnr_db"] for r in rows][::-1])
    ax.set_xlabel("SQNR vs reference (dB, higher is better)")
    ax.set_title("worst layers")
    ax.tick_params(axis="y", labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # type: ignore[attr-defined]
    return path


def _latency(plt: object, report: Report, path: Path) -> Path:
    latency = report.latency or {}
    names = list(latency)
    fig, ax = plt.subplots(figsize=(5, 3))  # type: ignore[attr-defined]
    # the whisker runs from the median up to p90 (a lower half would suggest a p10 that was never measured)
    upper = [latency[n].p90_ms - latency[n].median_ms for n in names]
    ax.bar(names, [latency[n].median_ms for n in names], yerr=[[0.0] * len(names), upper])
    ax.set_ylabel("ms (median, p90 bar)")
    ax.set_title(f"latency on {report.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # type: ignore[attr-defined]
    return path
