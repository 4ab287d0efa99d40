"""Stream intermediate activations of a model through ONNX Runtime.

The model is copied with the requested tensors added as graph outputs, run batch by batch
on the calibration data, and every tensor of every batch is handed to a consumer, which
reduces it (min/max, histogram, Gram matrix ...) and drops it. Memory therefore depends on
one batch, not on the number of samples. With many tensors, they are collected in groups,
one pass over the data per group, so a large model never holds all its activations at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from graphopt import runtime
from graphopt.calibration.sources import DataSpec, batch_samples, input_specs, iter_batches
from graphopt.errors import DataError

logger = logging.getLogger(__name__)

Consumer = Callable[[str, np.ndarray], None]


def with_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A clone of ``model`` whose graph also outputs the tensors ``names``."""
    clone = model.clone()
    values = _values_by_name(clone.graph)
    existing = {v.name for v in clone.graph.outputs}
    for name in names:
        if name in existing:
            continue
        value = values.get(name)
        if value is None:
            raise DataError(f"tensor {name!r} is not in the main graph, so it cannot be calibrated.")
        clone.graph.outputs.append(value)
        existing.add(name)
    return clone


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    values: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    return values


def stream_activations(
    model: ir.Model,
    data: DataSpec,
    names: Sequence[str],
    consume: Consumer,
    *,
    device: str = "cpu",
    group_size: int | None = None,
    threads: int | None = None,
) -> int:
    """Run ``model`` on ``data`` and call ``consume(name, array)`` for each tensor and batch.

    Args:
        model: The model as it is now (it is not modified).
        data: Calibration inputs.
        names: Tensors to observe: graph inputs or node outputs of the main graph.
        consume: Receives each tensor of each batch; it must not keep the array.
        device: ONNX Runtime device.
        group_size: At most this many tensors per pass over the data (None: all at once).
        threads: ONNX Runtime intra-op threads.

    Returns:
        The number of samples seen (per pass).
    """
    names = list(dict.fromkeys(names))
    specs = input_specs(model)
    size = group_size or max(len(names), 1)
    samples = 0
    for start in range(0, max(len(names), 1), size):
        group = names[start : start + size]
        augmented = with_outputs(model, group)
        session = runtime.create_session(augmented, device, threads=threads, optimization="disable")
        samples = 0
        for batch in iter_batches(data, specs):
            fetch = [n for n in group if n not in batch]
            # An empty fetch list means "all outputs" to ONNX Runtime: skip the run instead.
            outputs = runtime.run(session, batch, fetch) if fetch else {}
            for name in group:
                consume(name, batch[name] if name in batch else outputs[name])
            samples += batch_samples(batch)
        logger.debug("calibration: %d tensors over %d samples", len(group), samples)
    if samples == 0:
        raise DataError("the calibration data has no samples; give at least one batch.")
    return samples
