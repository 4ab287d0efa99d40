"""graphopt model zoo: small reference models exported to ONNX, with eval data.

Importing the package is torch-free; torch is imported only when a model has
to be (re)built. See :mod:`models.zoo` for the API.
"""

from __future__ import annotations

from models.zoo import (
    DEFAULT_CACHE_DIR,
    ZOO_NAMES,
    EvalData,
    cache_key,
    calibration_data,
    eval_data,
    export,
    info,
)

__all__ = [
    "DEFAULT_CACHE_DIR",
    "ZOO_NAMES",
    "EvalData",
    "cache_key",
    "calibration_data",
    "eval_data",
    "export",
    "info",
]
