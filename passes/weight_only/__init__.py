"""Weight-only quantization: block-wise int4/int8 and NF4 weights, activations stay float.

- ``quantize.py``: :class:`WeightOnlyQuantizePass` and its config; round-to-nearest
- ``gptq.py``: GPTQ's error-compensating rounding on calibrated Hessians
- ``lower.py``: the quantized blocks as ORT kernels (MatMulNBits, MatMulBnb4, blocked DQ)
- ``kernels.py``: which kernel ORT will run for each layer, and why
"""

from __future__ import annotations

from graphopt.passes.weight_only.config import WeightOnlyConfig
from graphopt.passes.weight_only.quantize import WeightOnlyQuantizePass

__all__ = ["WeightOnlyConfig", "WeightOnlyQuantizePass"]
