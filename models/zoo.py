"""Public model-zoo API: cached ONNX exports plus matching evaluation data.

Importing this module does not import torch; only building a model does, so
benchmarks can read cached models and eval data in a torch-free environment.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models import datasets
from models.fileio import atomic_write_bytes

if TYPE_CHECKING:
    from models.exporter import TorchModelSpec

logger = logging.getLogger(__name__)

ZOO_NAMES: tuple[str, ...] = ("mlp", "cnn", "transformer", "transformer_lora", "minilm")

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
DEFAULT_CACHE_DIR = REPO_ROOT / ".cache" / "zoo"
CLASSIFIERS = frozenset({"mlp", "cnn"})


@dataclass(frozen=True)
class EvalData:
    """Held-out inputs keyed by ONNX input name; labels only for classifiers."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None


def _check_name(name: str) -> None:
    if name not in ZOO_NAMES:
        raise ValueError(f"unknown zoo model {name!r}; valid names: {', '.join(ZOO_NAMES)}")


def _builder(name: str) -> Callable[[], TorchModelSpec]:
    # Lazy imports: torch / transformers load only when something is built.
    if name in CLASSIFIERS:
        from models import digits

        return digits.build_mlp if name == "mlp" else digits.build_cnn
    if name == "minilm":
        from models.minilm import build_minilm

        return build_minilm
    from models import transformer

    return transformer.build_transformer if name == "transformer" else transformer.build_transformer_lora


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cache_key() -> str:
    """Hash of the zoo sources/data plus the exporter stack's versions."""
    digest = hashlib.sha256()
    files = sorted([*PACKAGE_DIR.glob("*.py"), *(PACKAGE_DIR / "data").glob("*.txt")])
    for path in files:
        digest.update(path.relative_to(PACKAGE_DIR).as_posix().encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    for dist in ("torch", "onnxscript"):
        digest.update(f"{dist}=={_version(dist)}".encode())
    return digest.hexdigest()[:32]


def _paths(name: str, cache_dir: Path | None) -> tuple[Path, Path]:
    base = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    return base / f"{name}.onnx", base / f"{name}.json"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def export(name: str, cache_dir: Path | None = None, *, force: bool = False) -> Path:
    """Build (training where needed), export and cache ``<cache_dir>/<name>.onnx``.

    The sidecar ``<name>.json`` is written last and carries the cache key, so
    an interrupted export is simply redone on the next call.
    """
    _check_name(name)
    onnx_path, meta_path = _paths(name, cache_dir)
    key = cache_key()
    if not force and onnx_path.exists() and _read_json(meta_path).get("key") == key:
        logger.debug("zoo %s: cache hit at %s", name, onnx_path)
        return onnx_path
    meta = _build_and_save(name, onnx_path)
    meta["key"] = key
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2) + "\n").encode())
    return onnx_path


def _build_and_save(name: str, onnx_path: Path) -> dict[str, Any]:
    from models import exporter as onnx_export

    start = time.perf_counter()
    spec = _builder(name)()
    build_seconds = time.perf_counter() - start
    result = onnx_export.export_spec(spec)
    onnx_export.save_model(result.model, onnx_path)
    inputs, outputs = onnx_export.io_signature(result.model)
    meta: dict[str, Any] = {"name": name, **spec.metadata}
    if name in CLASSIFIERS:
        meta["torch_test_accuracy"] = meta.pop("test_accuracy")
        meta["test_accuracy"] = _ort_accuracy(onnx_path, eval_data(name))
    meta.update(
        inputs=inputs,
        outputs=list(outputs),
        output_specs=outputs,
        max_abs_err_torch_vs_ort=result.max_abs_err,
        build_seconds=round(build_seconds, 3),
        export_seconds=round(result.export_seconds, 3),
        total_seconds=round(time.perf_counter() - start, 3),
        op_histogram=onnx_export.op_histogram(result.model),
        num_nodes=len(result.model.graph.node),
        file_bytes=onnx_path.stat().st_size,
        opset=onnx_export.OPSET,
        ir_version=result.model.ir_version,
        torch_version=_version("torch"),
    )
    logger.info(
        "zoo %s: built in %.1fs, exported in %.1fs, max |torch-ort| %s",
        name,
        build_seconds,
        result.export_seconds,
        result.max_abs_err,
    )
    return meta


def _ort_accuracy(onnx_path: Path, data: EvalData) -> float:
    """Accuracy of the saved file itself, i.e. the figure compressed models must match."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, data.inputs)
    return float((logits.argmax(axis=1) == data.labels).mean())


def info(name: str, cache_dir: Path | None = None) -> dict[str, Any]:
    """Sidecar metadata of ``name`` (exporting first if the cache is missing or stale)."""
    _, meta_path = _paths(name, cache_dir)
    export(name, cache_dir)
    return _read_json(meta_path)


def _take(n: int | None, available: int, default: int, what: str) -> int:
    count = default if n is None else n
    if not 1 <= count <= available:
        raise ValueError(f"n must be in [1, {available}] for {what}, got {count}")
    return count


def _digits_inputs(name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    x = np.array(x, dtype=np.float32)  # writable copy of the cached split
    return {"input": datasets.digits_as_images(x) if name == "cnn" else x}


def eval_data(name: str, n: int | None = None) -> EvalData:
    """Held-out evaluation batch for ``name``.

    mlp/cnn: the first ``n`` (default all 540) digits test images with labels.
    transformer(_lora): ``n`` (default 16) rows of seeded random ids, seq 32.
    minilm: the first ``n`` (default 256) eval sentences, padded to the longest.
    """
    _check_name(name)
    if name in CLASSIFIERS:
        split = datasets.digits_split()
        count = _take(n, len(split.y_test), len(split.y_test), "the digits test split")
        return EvalData(_digits_inputs(name, split.x_test[:count]), split.y_test[:count].copy())
    if name == "minilm":
        sentences = datasets.eval_sentences()
        count = _take(n, len(sentences), len(sentences), "the minilm eval sentences")
        return EvalData(datasets.tokenize(sentences[:count]), None)
    rng = np.random.default_rng(datasets.TOKEN_EVAL_SEED)
    batch = _take(n, 4096, datasets.TOKEN_BATCH, "random token batches")
    return EvalData({"input_ids": datasets.random_token_ids(rng, batch, datasets.TOKEN_SEQ)}, None)


def calibration_data(name: str, n: int = 64) -> list[dict[str, np.ndarray]]:
    """``n`` calibration samples from the training side, each a batch of 1.

    mlp/cnn: the first ``n`` digits train images. transformer(_lora): ids from a
    seed distinct from eval_data's, seq 32. minilm: the sentences after the
    eval ones, each tokenized alone (unpadded, so seq length varies).
    """
    _check_name(name)
    if name in CLASSIFIERS:
        x_train = datasets.digits_split().x_train
        count = _take(n, len(x_train), n, "the digits train split")
        return [_digits_inputs(name, x_train[i : i + 1]) for i in range(count)]
    if name == "minilm":
        pool = datasets.calibration_sentences()
        count = _take(n, len(pool), n, "the minilm calibration sentences")
        return [datasets.tokenize([s]) for s in pool[:count]]
    rng = np.random.default_rng(datasets.TOKEN_CALIB_SEED)
    ids = datasets.random_token_ids(rng, _take(n, 4096, n, "random token batches"), datasets.TOKEN_SEQ)
    return [{"input_ids": ids[i : i + 1].copy()} for i in range(len(ids))]
