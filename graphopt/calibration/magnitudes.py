"""Largest magnitude of every float tensor on calibration data (what ``fp16`` keeps in float32 beyond its range)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.calibration.collect import stream_activations
from graphopt.passes.edit import infer_types
from graphopt.passes.fp16 import Fp16Config


def collect_magnitudes(model: ir.Model, data: object, config: Fp16Config) -> dict[str, float] | None:
    """Max |x| of every float tensor of the main graph on the calibration data (None without data)."""
    if data is None:
        return None
    infer_types(model)
    names = [out.name for node in model.graph for out in node.outputs if out.name and out.dtype == ir.DataType.FLOAT]
    magnitudes: dict[str, float] = {}

    def consume(name: str, array: np.ndarray) -> None:
        finite = np.abs(array[np.isfinite(array)]) if array.size else array
        magnitudes[name] = max(magnitudes.get(name, 0.0), float(finite.max(initial=0.0)))

    stream_activations(model, data, names, consume)  # type: ignore[arg-type]
    return magnitudes
