"""Number formats the passes store weights in, as numpy arithmetic (no graphs here).

- ``affine.py``: int8/uint8 scales and zero points, symmetric/asymmetric, per-tensor/per-channel
- ``blocks.py``: block-wise int4/int8 with per-block scales, nibble packing, MatMulNBits layout
- ``nf4.py``: NF4/FP4 code books with double quantization of the block scales (bitsandbytes layout)
"""
