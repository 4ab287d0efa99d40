"""A convolution's input as the rows of a product (im2col): what GPTQ's Hessian of a Conv weight sums.

A Conv with weight ``[O, C/g, *kernel]`` computes, for group ``j`` and each output position,
``patch_j @ W_j`` where ``patch_j`` is the ``C/g * prod(kernel)`` input values under the kernel
(channels of group ``j``, padded with zeros) and ``W_j = weight[j*O/g:(j+1)*O/g].reshape(O/g, -1).T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ConvGeometry:
    """How a Conv reads its input: 1-D or 2-D kernel, explicit pads (``[begin..., end...]``), groups."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    group: int = 1

    @property
    def columns(self) -> int:
        """Inputs per group per output position, given ``C/g`` input channels: multiply by it."""
        return int(np.prod(self.kernel))


def conv_patches(x: np.ndarray, geometry: ConvGeometry, rows: int, rng: np.random.Generator) -> np.ndarray:
    """``[n, group, C/g * prod(kernel)]`` patches of ``x [N, C, *spatial]``: at most ``rows`` output positions,
    drawn without replacement when there are more (only the drawn ones are copied out of ``x``)."""
    ndim = len(geometry.kernel)
    x = np.asarray(x, dtype=np.float32)
    if ndim == 1:  # a 1-D conv is a 2-D one with a unit width
        x = x[..., None]
        geometry = ConvGeometry(
            (*geometry.kernel, 1),
            (*geometry.strides, 1),
            (geometry.pads[0], 0, geometry.pads[1], 0),
            (*geometry.dilations, 1),
            geometry.group,
        )
    kh, kw = geometry.kernel
    dh, dw = geometry.dilations
    sh, sw = geometry.strides
    top, left, bottom, right = geometry.pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, c, h, w = x.shape
    extent_h, extent_w = (kh - 1) * dh + 1, (kw - 1) * dw + 1
    out_h, out_w = (h - extent_h) // sh + 1, (w - extent_w) // sw + 1
    if out_h <= 0 or out_w <= 0:
        return np.zeros((0, geometry.group, c // geometry.group * kh * kw), np.float32)
    total = n * out_h * out_w
    picked = np.arange(total) if total <= rows else np.sort(rng.choice(total, rows, replace=False))
    b, rest = np.divmod(picked, out_h * out_w)
    i, j = np.divmod(rest, out_w)
    # [rows, kh, kw] coordinates of every tap of every drawn position
    ys = (i * sh)[:, None, None] + (np.arange(kh) * dh)[None, :, None]
    xs = (j * sw)[:, None, None] + (np.arange(kw) * dw)[None, None, :]
    taps = x[b[:, None, None], :, ys, xs]  # [rows, kh, kw, C]
    taps = taps.transpose(0, 3, 1, 2)  # [rows, C, kh, kw]: the weight's (C/g, kh, kw) order within a group
    return np.ascontiguousarray(taps).reshape(len(picked), geometry.group, (c // geometry.group) * kh * kw)
