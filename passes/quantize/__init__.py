"""Static and dynamic int8 quantization as Q/DQ pairs that ONNX Runtime fuses into integer kernels.

- ``static.py``: :class:`QuantizeQDQPass` and its config; calibrated ranges per tensor
- ``dynamic.py``: MatMuls quantized at run time (no calibration data)
- ``outliers.py``: outlier input channels of MatMuls kept in float beside the int8 product
- ``layout.py``: rewrites that let ORT fuse integer ops (global pooling)
- ``qdq.py``: the Q/DQ edits (pairs, weights, biases, tables)
"""

from __future__ import annotations

from graphopt.passes.quantize.config import QuantizeConfig
from graphopt.passes.quantize.static import QuantizeQDQPass

__all__ = ["QuantizeConfig", "QuantizeQDQPass"]
