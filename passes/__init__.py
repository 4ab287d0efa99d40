"""graphopt's passes, one subpackage per family plus single-module passes.

- ``fold/``: exact clean-up (constant folding, onnxscript's rewrite rules, identity removal)
- ``lora/``: merge in-graph LoRA branches and PEFT adapters into weights (and undo it)
- ``quantize/``: static and dynamic int8 Q/DQ, calibrated ranges, outlier channels, integer layouts
- ``weight_only/``: block-wise int4/int8 and NF4 weights (round-to-nearest, GPTQ) lowered to ORT's kernels
- ``prune/``: unstructured, n:m and structured pruning with calibrated scores and recovery
- ``fp16.py``: float16 weights and compute; ``tune.py``: keep a rewrite only if ORT runs it faster
- ``edit.py``: the graph edits every family shares (names, initializers, node replacement, types)

The registry (:mod:`graphopt.registry`) names each pass by module path and imports it on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy(package: str, names: dict[str, str]) -> Callable[[str], object]:
    """A package's ``__getattr__`` that imports each exported name from its submodule on first use (PEP 562).

    A family's options module can then be imported (to list passes, to parse a recipe)
    without loading its pass code, onnx_ir and ONNX.
    """

    def __getattr__(name: str) -> object:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
