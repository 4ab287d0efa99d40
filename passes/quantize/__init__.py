"""Static and dynamic int8 quantization as Q/DQ pairs that ONNX Runtime fuses into integer kernels.

- ``config.py``: :class:`QuantizeConfig` and the same-size alternatives the accuracy fallback tries
- ``static.py``: :class:`QuantizeQDQPass`
- ``select.py``: which nodes and tensors are quantized (compute ops, integer islands, calibration targets)
- ``calibrate.py``: activation ranges (and MatMul input channel bounds) from calibration data
- ``editor.py``: the Q/DQ placement, node by node, once ranges are known
- ``dynamic.py``: MatMuls quantized at run time (no calibration data)
- ``outliers.py``: outlier input channels of MatMuls kept in float beside the int8 product
- ``layout.py``: rewrites that let ORT fuse integer ops (global pooling)
- ``qdq.py``: the Q/DQ edits (pairs, weights, biases, tables)
"""

from __future__ import annotations

from graphopt.passes import lazy

__all__ = ["QuantizeConfig", "QuantizeQDQPass"]
__getattr__ = lazy(__name__, {"QuantizeConfig": "config", "QuantizeQDQPass": "static"})
