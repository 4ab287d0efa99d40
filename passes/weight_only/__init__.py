"""Weight-only quantization: block-wise int4/int8 and NF4 weights, activations stay float.

- ``config.py``: :class:`WeightOnlyConfig` and the same-size alternatives (GPTQ for round-to-nearest)
- ``layers.py``: which weights are quantized (MatMul/Gemm matrices, embedding tables)
- ``quantize.py``: :class:`WeightOnlyQuantizePass`; round-to-nearest with clip search, mixed 4/8 bits
- ``gptq.py``: GPTQ's error-compensating rounding on calibrated Hessians
- ``awq.py``: activation-aware scaling of weight rows (AWQ), folded into what makes each layer input
- ``lower.py``: the quantized blocks as ORT kernels (MatMulNBits, MatMulBnb4, blocked DQ)
- ``kernels.py``: which kernel ORT will run for each layer, and why
"""

from __future__ import annotations

from graphopt.passes import lazy

__all__ = ["WeightOnlyConfig", "WeightOnlyQuantizePass"]
__getattr__ = lazy(__name__, {"WeightOnlyConfig": "config", "WeightOnlyQuantizePass": "quantize"})
