"""graphopt: an ONNX graph-level compression compiler.

import graphopt
result = graphopt.optimize("model.onnx", ["fold"])
graphopt.save(result.model, "model.opt.onnx", protect=["model.onnx"])
print(result.report.to_markdown())
"""

from __future__ import annotations

from graphopt.calibration.sources import DataSpec
from graphopt.errors import GraphoptError
from graphopt.io import load_model as load
from graphopt.io import save_model as save
from graphopt.pipeline import Pipeline, Result, optimize
from graphopt.recipe import Recipe, load_recipe
from graphopt.verify import Budget

__all__ = [
    "Budget",
    "DataSpec",
    "GraphoptError",
    "Pipeline",
    "Recipe",
    "Result",
    "load",
    "load_recipe",
    "optimize",
    "save",
]
__version__ = "0.1.0"
