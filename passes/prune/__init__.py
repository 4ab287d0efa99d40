"""Pruning: unstructured and n:m sparsity (magnitude, Wanda, SparseGPT), and structured channel removal.

- ``config.py``: :class:`PruneConfig`, :class:`PruneStructuredConfig`, the fallback's alternatives
- ``unstructured.py``: :class:`PruneWeightsPass` (unstructured and n:m)
- ``structured.py``: :class:`PruneStructuredPass` (channels, MLP units, heads)
- ``calibration.py``: per-layer activation statistics (norms, Gram matrices)
- ``scoring.py``: importance scores and n:m masks on weight rows
- ``groups.py``, ``rules.py``: which channels must be removed together, op by op
- ``surgery.py``: removing a channel group from every weight and shape it touches
- ``recovery.py``: least-squares reconstruction of the next layer after structured pruning
"""

from __future__ import annotations

from graphopt.passes import lazy

__all__ = ["PruneConfig", "PruneStructuredConfig", "PruneStructuredPass", "PruneWeightsPass"]
__getattr__ = lazy(
    __name__,
    {
        "PruneConfig": "config",
        "PruneStructuredConfig": "config",
        "PruneStructuredPass": "structured",
        "PruneWeightsPass": "unstructured",
    },
)
