"""LoRA: merge low-rank deltas into base weights (in-graph branches and PEFT adapter folders), or undo it.

- ``merge.py``: :class:`MergeLoraPass`, :class:`UnmergeLoraPass` and their configs
- ``adapters.py``: PEFT adapter folders (safetensors) read with numpy, combined
- ``branch.py``: in-graph ``x @ A @ B * s`` branches found and folded into the base op
- ``external.py``: adapter modules matched to graph weights by name
- ``targets.py``: where a base op's effective weight lives and how a delta is added to it
- ``quantized.py``: merging into int8/int4/NF4 bases (re-quantized, or kept beside in float)
"""

from __future__ import annotations

from graphopt.passes import lazy

__all__ = ["MergeLoraConfig", "MergeLoraPass", "UnmergeLoraConfig", "UnmergeLoraPass"]
__getattr__ = lazy(
    __name__,
    {"MergeLoraConfig": "config", "MergeLoraPass": "merge", "UnmergeLoraConfig": "config", "UnmergeLoraPass": "merge"},
)
