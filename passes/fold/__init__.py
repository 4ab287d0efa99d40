"""Exact clean-up: constant folding, onnxscript's rewrite rules and identity removal.

- ``constants.py``: :class:`FoldConstantsPass` and its config
- ``optimizer.py``: the onnxscript optimizer as the pass runs it (rules filtered by op type)
- ``rules.py``, ``layout_rules.py``, ``identity_rules.py``: exact rewrite rules onnxscript lacks
  (Conv affine, Slice/Transpose, neutral operands of any shape)
- ``shape_values.py``: shape arithmetic on symbolic dimensions (static parts become constants)
- ``defaults.py``: optional inputs holding their default (RNN zero states) dropped
- ``private_api.py``: the onnxscript/onnx_ir private names fold needs, in one place
"""

from __future__ import annotations

from graphopt.passes import lazy

__all__ = ["FoldConfig", "FoldConstantsPass"]
__getattr__ = lazy(__name__, {"FoldConfig": "config", "FoldConstantsPass": "constants"})
