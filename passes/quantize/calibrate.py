"""Calibration for the ``quantize`` pass: activation ranges (and MatMul input channel bounds) from data."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from graphopt.calibration.observers import ObserverConfig, observe_ranges
from graphopt.calibration.sources import require_data
from graphopt.passes.quantize import outliers as quantize_outliers
from graphopt.passes.quantize import rounding as quantize_rounding
from graphopt.passes.quantize.config import QuantizeConfig
from graphopt.passes.quantize.select import (
    COMPUTE_OPS,
    CalibratedRanges,
    Range,
    calibration_targets,
    is_weight,
    selected_nodes,
)


def collect_ranges(model: ir.Model, data: object, config: QuantizeConfig) -> CalibratedRanges | dict[str, Range] | None:
    """Calibrate the activation ranges the pass needs (the registry runs this before the pass).

    Returns None when ``mode`` is auto and there is no data: the pass then quantizes dynamically.
    """
    if config.mode == "auto" and data is None:
        return None
    names = calibration_targets(model, config)
    if not names:
        return {}
    data = require_data(data, "quantize")

    def observer(qtype: str) -> ObserverConfig:
        return ObserverConfig(
            method=config.method,
            percentile=config.percentile,
            symmetric=config.activation_symmetric,
            num_bits=16 if qtype.endswith("16") else 8,
            unsigned=qtype.startswith("u"),
        )

    per_tensor = {name: observer(config.tensor_types.get(name, config.activation_type)) for name in names}
    # Large models are observed in groups of tensors so their activations never coexist.
    group = (
        64 if sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value) > 2**30 else None
    )
    wanted = set(names)
    bounds = quantize_outliers.ChannelBounds(
        n.inputs[0].name
        for n in selected_nodes(model.graph, config)
        if n.inputs[0] is not None
        and n.inputs[0].name in wanted
        and (
            (config.outliers > 0 and quantize_outliers.eligible_matmul(n))
            or (config.smooth and n.op_type in ("MatMul", "Gemm") and len(n.inputs) > 1 and is_weight(n.inputs[1]))
        )
    )
    hessians = None
    if config.rounding == "gptq":
        hessians = quantize_rounding.HessianPlan(
            n for n in selected_nodes(model.graph, config) if n.op_type in COMPUTE_OPS and n.inputs[0] is not None
            and n.inputs[0].name in wanted
        )  # fmt: skip

    def also(name: str, array: np.ndarray) -> None:
        bounds(name, array)
        if hessians is not None:
            hessians(name, array)

    ranges = observe_ranges(model, data, names, per_tensor, group_size=group, also=also)  # type: ignore[arg-type]
    return CalibratedRanges(
        ranges, bounds.bounds, hessians.hessians() if hessians is not None else None, power=bounds.power()
    )
