"""GPTQ rounding of the ``quantize`` pass's int8 weights (``rounding: gptq``).

Round-to-nearest makes each weight's own error small; what matters is the layer's output error
``tr(D^T H D)`` for ``D = W - Q(W)`` and ``H = X^T X / n`` of the layer's input rows. GPTQ (Frantar
et al., 2022; the data-driven relative of AdaRound without its training loop) rounds the input
rows one at a time and moves each row's error onto the rows not yet rounded. The per-channel
scales stay those of round-to-nearest, so the Q/DQ layout, the 7-bit range and ORT's fused
kernels are unchanged; only which integer each weight gets moves.

``H`` is summed while calibration streams (the same ONNX Runtime pass that observes the
activation ranges): MatMul/Gemm rows are the input's last axis, a Conv's are its patches
(:mod:`graphopt.numerics.patches`), diagonal blocks of at most 512 rows per group (see
:class:`HessianPlan`). A layer keeps GPTQ's codes only where its output error is lower.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from graphopt.numerics import affine
from graphopt.numerics import gptq as numerics_gptq
from graphopt.numerics.patches import ConvGeometry, conv_patches
from graphopt.passes import edit
from graphopt.passes.quantize.select import weight_array

logger = logging.getLogger(__name__)

DAMP = 0.01  # GPTQ's dampening of H's diagonal, as a fraction of its mean


@dataclass(frozen=True)
class Reader:
    """One layer reading a weight: its input tensor and how it turns the input into rows (None: last axis)."""

    input: str
    geometry: ConvGeometry | None


def reader(node: ir.Node) -> tuple[Reader, int] | None:
    """How ``node`` (Conv, MatMul or Gemm with a constant float weight) reads its input, and ``K`` per group (the
    weight's rows as ``X @ W`` reads it); None if GPTQ cannot model it here (3-D convs, auto_pad other than
    NOTSET/VALID, a transposed Gemm input, a weight that is not 2-D for MatMul/Gemm)."""
    x = node.inputs[0] if node.inputs else None
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    array = weight_array(weight)
    if x is None or not x.name or array is None:
        return None
    shape = array.shape
    if node.op_type in ("MatMul", "Gemm"):
        if len(shape) != 2 or (node.op_type == "Gemm" and node.attributes.get_int("transA", 0)):
            return None
        return Reader(x.name, None), int(shape[1] if edit.trans_b(node) else shape[0])
    if node.op_type != "Conv" or len(shape) not in (3, 4):
        return None
    kernel = tuple(int(d) for d in shape[2:])
    rank = len(kernel)
    auto_pad = node.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return None
    pads = tuple(node.attributes.get_ints("pads", [0] * 2 * rank)) if auto_pad == "NOTSET" else (0,) * 2 * rank
    geometry = ConvGeometry(
        kernel=kernel,
        strides=tuple(node.attributes.get_ints("strides", [1] * rank)),
        pads=pads,
        dilations=tuple(node.attributes.get_ints("dilations", [1] * rank)),
        group=node.attributes.get_int("group", 1),
    )
    return Reader(x.name, geometry), int(np.prod(shape[1:]))


def blocks_of(k: int, block: int) -> tuple[int, int]:
    """``(count, size)`` of the diagonal blocks ``K`` rows are cut into: equal sizes of at most ``block``, the
    last one padded with zero rows (``count * size >= k``)."""
    count = max(1, -(-k // block))
    return count, -(-k // count)


class HessianPlan:
    """Which weights get GPTQ and the diagonal blocks of ``X^T X`` summed for them; a calibration consumer.

    Each group's ``K`` input rows are cut into blocks of at most ``block`` rows (whole input channels are not
    needed: a block is a run of rows), and only the products within a block are summed. GPTQ then moves a
    rounding error only within its block. On a real ResNet-18 (malviz-resnet18, 7-bit per-channel weights) this
    cut layers' output error to 21% of round-to-nearest's at ``block=512``, against 7% for whole Hessians, for
    a fraction of the cost: a ``4608 x 4608`` Hessian (a 3x3 conv over 512 channels) is summed and inverted as
    nine ``512 x 512`` blocks. At most ``rows`` positions are drawn per batch and ``total`` per layer (the
    first batches': 32 times a block's size), which bounds the cost whatever the amount of calibration data.
    """

    def __init__(
        self, nodes: Iterable[ir.Node], *, rows: int = 1024, total: int = 16384, block: int = 512, seed: int = 0
    ) -> None:
        self.rows, self.total, self.block = rows, total, block
        self.readers: dict[str, list[Reader]] = {}
        self.columns: dict[Reader, int] = {}
        for node in nodes:
            found = reader(node)
            if found is None:
                continue
            self.columns[found[0]] = found[1]
            self.readers.setdefault(node.inputs[1].name, []).append(found[0])  # type: ignore[union-attr]
        self.by_input: dict[str, list[Reader]] = {}
        for r in self.columns:
            self.by_input.setdefault(r.input, []).append(r)
        self.sums: dict[Reader, np.ndarray] = {}
        self.counts: dict[Reader, int] = {}
        self._rng = np.random.default_rng(seed)

    @property
    def inputs(self) -> list[str]:
        return list(self.by_input)

    def _rows(self, x: np.ndarray, r: Reader) -> np.ndarray | None:
        """``[n, groups, K]`` rows of the layer's product, at most ``self.rows`` of them."""
        if r.geometry is None:
            rows = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
            if len(rows) > self.rows:
                rows = rows[np.sort(self._rng.choice(len(rows), self.rows, replace=False))]
            return rows[:, None, :]
        if x.ndim != len(r.geometry.kernel) + 2:
            return None
        return conv_patches(x, r.geometry, self.rows, self._rng)

    def __call__(self, name: str, array: np.ndarray) -> None:
        for r in self.by_input.get(name, ()):
            if self.counts.get(r, 0) >= self.total:  # enough rows for the blocks: the rest of the data adds cost only
                continue
            rows = self._rows(np.asarray(array, dtype=np.float32), r)
            if rows is None or rows.shape[2] != self.columns[r]:
                continue
            rows = rows[np.isfinite(rows).all(axis=(1, 2)) & (np.abs(rows) < 1e15).all(axis=(1, 2))]
            if not len(rows):
                continue
            count, size = blocks_of(rows.shape[2], self.block)
            if count * size != rows.shape[2]:
                rows = np.pad(rows, ((0, 0), (0, 0), (0, count * size - rows.shape[2])))
            cut = rows.reshape(len(rows), rows.shape[1] * count, size)
            gram = np.matmul(cut.transpose(1, 2, 0), cut.transpose(1, 0, 2))  # [groups * count, size, size]
            if r in self.sums:
                if self.sums[r].shape != gram.shape:
                    continue
                self.sums[r] += gram
            else:
                self.sums[r] = gram
            self.counts[r] = self.counts.get(r, 0) + len(rows)

    def hessians(self) -> dict[str, np.ndarray]:
        """``{weight: H [groups * blocks, size, size]}``: the diagonal blocks of the mean over every reader's
        rows (a weight read by several layers sums them all)."""
        out: dict[str, np.ndarray] = {}
        shared: dict[tuple[Reader, ...], np.ndarray] = {}  # Q, K and V read one input: one array for the three
        for weight, readers in self.readers.items():
            if not all(r in self.sums for r in readers) or len({self.sums[r].shape for r in readers}) != 1:
                continue
            total = sum(self.counts[r] for r in readers)
            key = tuple(dict.fromkeys(readers))
            if total and key not in shared:
                shared[key] = sum(self.sums[r] for r in key) / np.float32(total)
            if key in shared:
                out[weight] = shared[key]
        return out


def _as_columns(array: np.ndarray, op_type: str, trans_b: bool, group: int) -> list[np.ndarray]:
    """The weight as ``[K, N]`` matrices, one per group."""
    if op_type == "Conv":
        per = array.shape[0] // group
        return [array[j * per : (j + 1) * per].reshape(per, -1).T for j in range(group)]
    return [array.T if trans_b else array]


def _from_columns(mats: list[np.ndarray], op_type: str, trans_b: bool, shape: tuple[int, ...]) -> np.ndarray:
    if op_type == "Conv":
        return np.concatenate([m.T for m in mats]).reshape(shape)
    return mats[0].T if trans_b else mats[0]


def memo_key(
    array: np.ndarray, params: affine.QuantParams, hessian: np.ndarray, node: ir.Node, *flags: object
) -> tuple[object, ...]:
    """What :func:`round_weight`'s result depends on, with the arrays as a digest: the accuracy fallback re-runs the
    pass dozens of times on one calibration, and a layer's GPTQ codes (fixed scales, fixed Hessian) do not change
    between trials unless its weight, scales or Hessian did (SmoothQuant rescales both)."""
    digest = hashlib.blake2b(digest_size=16)
    for part in (array, params.scale, params.zero_point, hessian):
        part = np.ascontiguousarray(part)
        digest.update(f"{part.dtype}{part.shape}".encode())
        digest.update(part.tobytes())
    group = node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1
    return (node.op_type, group, edit.trans_b(node), params.qtype, params.axis, *flags, digest.digest())


def round_weight(
    array: np.ndarray,
    params: affine.QuantParams,
    hessian: np.ndarray,
    node: ir.Node,
    *,
    symmetric: bool,
    reduce_range: bool,
    block: int = 512,
) -> tuple[np.ndarray, float, float] | None:
    """GPTQ's integer codes for ``array`` under ``params`` (its per-channel scales unchanged), with the layer's
    output error (within the summed blocks) under round-to-nearest and under GPTQ; None where the Hessian
    does not fit the weight."""
    trans_b = edit.trans_b(node)
    group = node.attributes.get_int("group", 1) if node.op_type == "Conv" else 1
    w = array.astype(np.float32)
    mats = _as_columns(w, node.op_type, trans_b, group)
    k = mats[0].shape[0]
    count, size = blocks_of(k, block)
    if hessian.shape != (group * count, size, size):
        return None
    qmin, qmax = affine.qrange(params.qtype, symmetric=symmetric, reduce_range=reduce_range)
    columns = w.shape[0] if node.op_type == "Conv" else mats[0].shape[1]
    scale = np.broadcast_to(np.asarray(params.scale, np.float32).reshape(-1), (columns,))
    zero = np.broadcast_to(np.asarray(params.zero_point, np.float32).reshape(-1), (columns,))
    per = columns // group
    # every group's every block is one [size, per] problem: [group * count, size, per], solved together
    padded = np.pad(np.stack(mats), ((0, 0), (0, count * size - k), (0, 0)))  # zero rows: on the grid, never moved
    padded = padded.reshape(group * count, size, per)
    scale = np.repeat(scale.reshape(group, 1, per), count, axis=0)
    zero = np.repeat(zero.reshape(group, 1, per), count, axis=0)
    # Weights that were exactly zero (pruned, 2:4) stay zero: GPTQ moves the error of the others, never the
    # sparsity pattern (as SparseGPT's mask).
    zeros = padded == 0

    def snap(values: np.ndarray, scale: np.ndarray, zero: np.ndarray, keep: np.ndarray) -> np.ndarray:
        q = np.clip(np.rint(values / scale) + zero, qmin, qmax)
        return np.where(keep, 0.0, (q - zero) * scale).astype(np.float32)

    nearest = snap(padded, scale, zero, zeros)  # round-to-nearest: every row at once
    order, u, ok = numerics_gptq.prepare_stack(hessian, DAMP)
    permuted = np.take_along_axis(padded, order[:, :, None], axis=1)
    zeros_permuted = np.take_along_axis(zeros, order[:, :, None], axis=1)
    found = numerics_gptq.gptq_stack(permuted, u, lambda i, v: snap(v, scale[:, 0], zero[:, 0], zeros_permuted[:, i]))
    candidate = np.empty_like(found)
    np.put_along_axis(candidate, order[:, :, None], found, axis=1)
    candidate = np.where(ok[:, None, None], candidate, nearest)  # a Hessian that stays singular: nearest
    e_near = numerics_gptq.output_error_stack(padded, nearest, hessian)
    e_gptq = numerics_gptq.output_error_stack(padded, candidate, hessian)
    out = np.where((e_gptq < e_near)[:, None, None], candidate, nearest)  # a block keeps GPTQ's codes if better
    rounded = list(out.reshape(group, count * size, per)[:, :k])
    values = _from_columns(rounded, node.op_type, trans_b, w.shape)
    return params.quantize(values), float(e_near.sum()), float(np.minimum(e_near, e_gptq).sum())
