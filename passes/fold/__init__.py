"""Exact clean-up: constant folding, onnxscript's rewrite rules and identity removal.

- ``constants.py``: :class:`FoldConstantsPass` and its config
- ``optimizer.py``: the onnxscript optimizer as the pass runs it (rules filtered by op type)
"""

from __future__ import annotations

from graphopt.passes.fold.constants import FoldConfig, FoldConstantsPass

__all__ = ["FoldConfig", "FoldConstantsPass"]
