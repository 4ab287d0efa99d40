"""Raising a model's opset before the passes that need a newer one (exporters still write opset 7-12).

The conversion is onnxscript's version converter (onnx's C++ converter as its fallback). It is
only kept when ONNX Runtime computes the same outputs before and after: a user cannot re-export
a third-party model, but must not get a different one either.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir

from graphopt import verify
from graphopt.calibration.sources import Batch

logger = logging.getLogger(__name__)

# Outputs of the converted model must match the input's this closely (float rounding only).
EQUAL_REL_L2 = 1e-5


@dataclass
class OpsetChange:
    """What the pipeline did about the model's opset, for the report."""

    before: int
    wanted: int
    after: int
    reason: str  # why it was (not) converted

    def to_dict(self) -> dict[str, Any]:
        return {"before": self.before, "wanted": self.wanted, "after": self.after, "reason": self.reason}


def model_opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1)))


def wanted_opset(steps: Sequence[Any]) -> int:
    """The highest opset a step's config asks for (0: none asks)."""
    return max((step.spec.opset_for(step.config) for step in steps), default=0)


def upgrade(model: ir.Model, target: int, batches: Sequence[Batch], device: str) -> tuple[ir.Model, OpsetChange]:
    """``model`` converted to opset ``target`` when ORT computes the same outputs; else ``model`` itself."""
    from onnxscript import version_converter  # here: importing onnxscript costs ~0.2 s, and few models need it

    before = model_opset(model)
    converted = model.clone()
    try:
        version_converter.convert_version(converted, target, fallback=True)
    except Exception as exc:  # the converters raise many types; any failure means: keep the original
        reason = f"conversion to opset {target} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        logger.warning("%s; passes run at opset %d", reason, before)
        return model, OpsetChange(before, target, before, reason)
    after = model_opset(converted)
    if after < target:
        return model, OpsetChange(before, target, before, f"the converter stopped at opset {after}")
    try:
        result = verify.compare(model, converted, batches, device=device)
    except Exception as exc:  # a converted model ORT cannot load or run is not kept
        reason = f"ONNX Runtime rejects the converted model ({str(exc).splitlines()[0][:200]})"
        logger.warning("%s; passes run at opset %d", reason, before)
        return model, OpsetChange(before, target, before, reason)
    worst = max((o.rel_l2 for o in result.outputs), default=0.0)
    if not worst <= EQUAL_REL_L2:
        reason = f"the converted model's outputs differ (relative L2 {worst:.3g})"
        logger.warning("%s; passes run at opset %d", reason, before)
        return model, OpsetChange(before, target, before, reason)
    reason = f"converted; outputs equal in ONNX Runtime (rel L2 {worst:.2g})"
    return converted, OpsetChange(before, target, after, reason)
