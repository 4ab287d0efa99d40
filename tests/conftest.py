"""Shared fixtures: a lossy stand-in pass registered for the duration of a test."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import pytest

import graphopt
from graphopt import registry
from graphopt.calibration.sources import require_data


@dataclass(frozen=True)
class NoiseConfig:
    scale: float = 0.1


class AddNoisePass(ir.passes.InPlacePass):
    """Perturb every float weight (a stand-in for a lossy pass)."""

    def __init__(self, config: NoiseConfig, statistics: object = None) -> None:
        super().__init__()
        self.config, self.statistics = config, statistics

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            value.const_value = ir.tensor(array + self.config.scale * np.ones_like(array), name=value.name)
        return ir.passes.PassResult(model, modified=True)


@pytest.fixture
def with_noise_pass(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    seen: list[object] = []

    def calibrate(model: ir.Model, data: graphopt.DataSpec, config: NoiseConfig) -> str:
        seen.append(require_data(data, "calibrated_noise").source)
        return "stats"

    specs = {
        "noise": registry.PassSpec("noise", AddNoisePass, NoiseConfig, exact=False),
        "calibrated_noise": registry.PassSpec(
            "calibrated_noise", AddNoisePass, NoiseConfig, exact=False, calibrate=calibrate
        ),
    }
    original = registry.get_spec
    monkeypatch.setattr(registry, "get_spec", lambda name: specs[name] if name in specs else original(name))
    return seen
