"""graphopt: an ONNX graph-level compression compiler.

import graphopt
result = graphopt.optimize("model.onnx", ["fold"])
graphopt.save(result.model, "model.opt.onnx", protect=["model.onnx"])
print(result.report.to_markdown())

The names below are imported on first use (PEP 562), so ``import graphopt`` and
``graphopt --help`` stay fast; ``graphopt.optimize`` loads the pipeline.
"""

from __future__ import annotations

import importlib

_API = {
    "Budget": "graphopt.budget",
    "DataSpec": "graphopt.calibration.sources",
    "GraphoptError": "graphopt.errors",
    "Pipeline": "graphopt.pipeline",
    "Recipe": "graphopt.recipe",
    "Result": "graphopt.pipeline",
    "load": ("graphopt.io", "load_model"),
    "load_recipe": "graphopt.recipe",
    "optimize": "graphopt.pipeline",
    "save": ("graphopt.io", "save_model"),
}

__all__ = sorted(_API)
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    where = _API.get(name)
    if where is None:
        try:  # a submodule used as an attribute (graphopt.registry, graphopt.recipe, ...)
            return importlib.import_module(f"graphopt.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module 'graphopt' has no attribute {name!r}") from None
    module, attribute = where if isinstance(where, tuple) else (where, name)
    return getattr(importlib.import_module(module), attribute)
