"""Timing a rewrite in ONNX Runtime on calibration data: what the ``tune`` pass decides on."""

from __future__ import annotations

import onnx_ir as ir

from graphopt import runtime
from graphopt.calibration.sources import DataSpec, input_specs, iter_batches
from graphopt.errors import DataError
from graphopt.passes.tune import TuneConfig, TuneDecision, block_skip_layernorm, residual_adds


def measure(model: ir.Model, data: DataSpec | None, config: TuneConfig) -> TuneDecision:
    """Time the model as it is against the rewritten variant on one batch of ``data``."""
    if not residual_adds(model.graph):
        return TuneDecision(False, {}, "no Add -> LayerNormalization sites")
    try:
        feeds = next(iter(iter_batches(data or DataSpec(samples=1), input_specs(model))))
    except (DataError, StopIteration) as exc:
        return TuneDecision(False, {}, f"no inputs to time with ({exc}); give calibration data")
    variant = model.clone()
    block_skip_layernorm(variant)
    sessions = {
        "as is": runtime.create_session(model, config.device, threads=config.threads),
        "Add -> Sum": runtime.create_session(variant, config.device, threads=config.threads),
    }
    latency = runtime.interleaved_latency(sessions, feeds, runs=config.runs)
    medians = {name: lat.median_ms for name, lat in latency.items()}
    faster = medians["Add -> Sum"] < (1.0 - config.min_gain) * medians["as is"]
    return TuneDecision(faster, medians, "measured")
