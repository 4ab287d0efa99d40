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
