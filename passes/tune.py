"""Measured tuning for ONNX Runtime: keep a graph rewrite only if it runs faster here."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_ir as ir

from graphopt.passes.options import TuneConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneDecision:
    """What the measurement found: which rewrite to apply and the latencies behind it."""

    skip_layernorm_fusion: bool
    latency_ms: dict[str, float]
    reason: str = ""


def residual_adds(graph: ir.Graph) -> list[ir.Node]:
    """Adds of two activations read only by LayerNormalization (what ORT fuses into SkipLayerNormalization)."""
    found = []
    for node in graph:
        if node.op_type != "Add" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        out = node.outputs[0]
        uses = list(out.uses())
        if not uses or out.is_graph_output() or any(u.node.op_type != "LayerNormalization" for u in uses):
            continue
        if all(v is not None and v.const_value is None for v in node.inputs):
            found.append(node)
    return found


def block_skip_layernorm(model: ir.Model) -> int:
    # Sum computes the same broadcast addition, but ORT's SkipLayerNormFusion only matches Add.
    count = 0
    for node in residual_adds(model.graph):
        node.op_type = "Sum"
        count += 1
    return count


class TuneForRuntimePass(ir.passes.InPlacePass):
    """Apply the rewrites that measurably speed up ONNX Runtime on this machine.

    Today one rewrite is tried: ORT's CPU EP fuses Add + LayerNormalization into
    SkipLayerNormalization, which on some CPUs is slower than the two ops apart (seen here:
    MiniLM 64.6 -> 58.0 ms, fp32, 1 thread). The pass turns those Adds into the
    equivalent Sum only when the timing made before it runs says so; outputs are unchanged.
    Only the main graph is considered.

    Attributes:
        config: The pass options.
        decision: The measurement made by the calibration step.
    """

    def __init__(self, config: TuneConfig, decision: TuneDecision) -> None:
        super().__init__()
        self.config, self.decision = config, decision
        self.details: dict[str, object] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = block_skip_layernorm(model) if self.decision.skip_layernorm_fusion else 0
        self.details = {
            "skip_layernorm_fusion_blocked": count,
            "latency_ms": dict(self.decision.latency_ms),
            "reason": self.decision.reason,
        }
        return ir.passes.PassResult(model, modified=bool(count))
