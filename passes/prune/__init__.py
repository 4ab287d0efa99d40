"""Pruning: unstructured and n:m sparsity (magnitude, Wanda, SparseGPT), and structured channel removal.

- ``unstructured.py``: :class:`PruneWeightsPass` and its config
- ``structured.py``: :class:`PruneStructuredPass` and its config (channels, MLP units, heads)
- ``calibration.py``: per-layer activation statistics (norms, Gram matrices)
- ``scoring.py``: importance scores and n:m masks on weight rows
- ``groups.py``, ``rules.py``: which channels must be removed together, op by op
- ``surgery.py``: removing a channel group from every weight and shape it touches
- ``recovery.py``: least-squares reconstruction of the next layer after structured pruning
"""

from __future__ import annotations

from graphopt.passes.prune.structured import PruneStructuredConfig, PruneStructuredPass
from graphopt.passes.prune.unstructured import PruneConfig, PruneWeightsPass

__all__ = ["PruneConfig", "PruneStructuredConfig", "PruneStructuredPass", "PruneWeightsPass"]
