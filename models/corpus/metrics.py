"""Task metrics shared by corpus entries: each compares a compressed model's outputs with the fp32 model's."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.corpus.base import Outputs


def _flat(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(-1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two tensors flattened (1.0 when both are zero)."""
    a, b = _flat(a), _flat(b)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def mean_cosine(reference: Sequence[Outputs], candidate: Sequence[Outputs], output: int = 0) -> float:
    """Mean over samples of the cosine of one output (embeddings, spectra, masks)."""
    return float(np.mean([cosine(r[output], c[output]) for r, c in zip(reference, candidate, strict=True)]))


def label_agreement(
    reference: Sequence[Outputs], candidate: Sequence[Outputs], output: int = 0, axis: int = -1
) -> float:
    """Share of argmax labels (along ``axis``, every other position counted) equal to the fp32 model's."""
    same = total = 0
    for r, c in zip(reference, candidate, strict=True):
        lr, lc = np.argmax(r[output], axis=axis), np.argmax(c[output], axis=axis)
        same += int(np.sum(lr == lc))
        total += lr.size
    return same / max(total, 1)


def ctc_greedy(labels: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """CTC greedy decode of ``[batch, time]`` label ids: collapse repeats, drop blanks."""
    texts = []
    for row in np.atleast_2d(labels):
        out, prev = [], None
        for t in row.tolist():
            if t != prev and t != blank:
                out.append(t)
            prev = t
        texts.append(tuple(out))
    return texts


def ctc_text_equality(
    reference: Sequence[Outputs], candidate: Sequence[Outputs], output: int = 0, blank: int = 0, time_axis: int = 1
) -> float:
    """Share of decoded texts equal to the fp32 model's (scores ``[batch, time, classes]`` or ``[time, batch, c]``)."""
    same = total = 0
    for r, c in zip(reference, candidate, strict=True):
        lr, lc = np.argmax(r[output], axis=-1), np.argmax(c[output], axis=-1)
        if time_axis == 0:
            lr, lc = lr.T, lc.T
        for a, b in zip(ctc_greedy(lr, blank), ctc_greedy(lc, blank), strict=True):
            same += int(a == b)
            total += 1
    return same / max(total, 1)


def mask_iou(
    reference: Sequence[Outputs], candidate: Sequence[Outputs], output: int = 0, threshold: float = 0.5
) -> float:
    """Intersection over union of the thresholded maps, pooled over samples (1.0 when both are empty)."""
    inter = union = 0
    for r, c in zip(reference, candidate, strict=True):
        mr, mc = np.asarray(r[output]) > threshold, np.asarray(c[output]) > threshold
        inter += int(np.sum(mr & mc))
        union += int(np.sum(mr | mc))
    return 1.0 if union == 0 else inter / union


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of ``[n, 4]`` and ``[m, 4]`` boxes given as x1, y1, x2, y2."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: np.prod(np.clip(x[:, 2:] - x[:, :2], 0, None), axis=-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-12)


def detection_f1(
    reference_boxes: Sequence[np.ndarray], candidate_boxes: Sequence[np.ndarray], iou: float = 0.5
) -> float:
    """F1 of the candidate's boxes against the fp32 model's, greedy one-to-one matching at ``iou``.

    Each entry is one sample's ``[n, 4]`` boxes (x1, y1, x2, y2) after the model's own decoding and NMS.
    """
    tp = fp = fn = 0
    for ref, cand in zip(reference_boxes, candidate_boxes, strict=True):
        ref, cand = np.asarray(ref).reshape(-1, 4), np.asarray(cand).reshape(-1, 4)
        if len(ref) == 0 or len(cand) == 0:
            fp, fn = fp + len(cand), fn + len(ref)
            continue
        m = box_iou(cand, ref)
        used: set[int] = set()
        for i in np.argsort(-m.max(axis=1)):
            j = next((int(j) for j in np.argsort(-m[i]) if m[i, j] >= iou and int(j) not in used), None)
            if j is None:
                fp += 1
            else:
                used.add(j)
                tp += 1
        fn += len(ref) - len(used)
    if tp + fp + fn == 0:
        return 1.0
    return 2 * tp / (2 * tp + fp + fn)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.45) -> np.ndarray:
    """Indices kept by greedy non-maximum suppression (boxes x1, y1, x2, y2)."""
    order = np.argsort(-np.asarray(scores))
    keep: list[int] = []
    while len(order):
        i = int(order[0])
        keep.append(i)
        if len(order) == 1:
            break
        rest = order[1:]
        order = rest[box_iou(boxes[i : i + 1], boxes[rest])[0] < iou]
    return np.asarray(keep, dtype=np.int64)


def decision_agreement(
    reference: Sequence[Outputs], candidate: Sequence[Outputs], output: int = 0, threshold: float = 0.5
) -> float:
    """Share of per-element binary decisions (score > threshold) equal to the fp32 model's (VAD frames, wake words)."""
    same = total = 0
    for r, c in zip(reference, candidate, strict=True):
        dr, dc = np.asarray(r[output]) > threshold, np.asarray(c[output]) > threshold
        same += int(np.sum(dr == dc))
        total += dr.size
    return same / max(total, 1)
