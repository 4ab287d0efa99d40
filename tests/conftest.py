"""Shared fixtures: lossy stand-in passes, registered the public way (a registry extended for the test)."""

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
    exclude: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()


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


@dataclass
class NoisePasses:
    """A registry with the stand-in passes, and the data sources the calibrated one was given."""

    known: registry.Registry
    seen: list[object]


@pytest.fixture
def noise_passes() -> NoisePasses:
    seen: list[object] = []

    def calibrate(model: ir.Model, data: graphopt.DataSpec, config: NoiseConfig) -> str:
        seen.append(require_data(data, "calibrated_noise").source)
        return "stats"

    known = registry.REGISTRY.with_passes(
        registry.PassSpec("noise", AddNoisePass, NoiseConfig, lossy=registry.Lossy()),
        registry.PassSpec("calibrated_noise", AddNoisePass, NoiseConfig, calibrate=calibrate, lossy=registry.Lossy()),
    )
    return NoisePasses(known, seen)
