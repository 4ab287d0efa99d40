"""Real PEFT LoRA builds of zoo models, the references ``merge_lora`` is measured against.

Each case wraps a zoo base module with ``peft.get_peft_model`` (LoRA B drawn nonzero, so
the adapters change the outputs) and exports, all cached under ``.cache/lora/<case>/``:

- ``lora.onnx``: the PEFT model with its LoRA branches in the graph;
- ``merged.onnx``: PEFT's own ``merge_and_unload()``, the reference output;
- ``base.onnx``: the base model without LoRA (external adapters merge into it);
- ``adapter/``: the adapter as ``save_pretrained`` writes it.

``exporter`` picks the zoo's dynamo pipeline (``models.exporter``) or the TorchScript exporter.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models import zoo
from models.exporter import TorchModelSpec, export_spec, save_model
from models.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

CACHE_DIR = zoo.REPO_ROOT / ".cache" / "lora"
TRANSFORMER_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
MINILM_TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


@dataclass(frozen=True)
class LoraCase:
    """Where one case's files are."""

    folder: Path

    @property
    def lora(self) -> Path:
        return self.folder / "lora.onnx"

    @property
    def merged(self) -> Path:
        return self.folder / "merged.onnx"

    @property
    def base(self) -> Path:
        return self.folder / "base.onnx"

    @property
    def adapter(self) -> Path:
        return self.folder / "adapter"


def add_lora(
    base: torch.nn.Module,
    targets: tuple[str, ...],
    *,
    rank: int = 8,
    alpha: float = 16,
    seed: int = 1,
    b_std: float = 0.08,
    use_rslora: bool = False,
) -> Any:
    """``peft.get_peft_model`` on ``base`` with LoRA B drawn from N(0, b_std) instead of zeros."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, use_rslora=use_rslora)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, b_std, generator=generator)
    return model.eval()


def _export(module: torch.nn.Module, spec: TorchModelSpec, path: Path, exporter: str) -> None:
    spec = dataclasses.replace(spec, module=module)
    if exporter == "dynamo":
        save_model(export_spec(spec).model, path)
        return
    module.eval()
    torch.onnx.export(
        module,
        tuple(torch.tensor(v) for v in spec.example_inputs.values()),
        str(path),
        dynamo=False,
        input_names=list(spec.example_inputs),
        output_names=list(spec.output_names),
        dynamic_axes={k: dict(v) for k, v in spec.dynamic_axes.items()},
        opset_version=18,
    )


def build_case(
    name: str,
    make_base: Callable[[], torch.nn.Module],
    spec: TorchModelSpec,
    targets: tuple[str, ...],
    *,
    exporter: str = "dynamo",
    force: bool = False,
    **lora: Any,
) -> LoraCase:
    """Build (or reuse from the cache) the four files of one case."""
    case = LoraCase(CACHE_DIR / name)
    key = json.dumps([zoo.cache_key(), importlib.metadata.version("peft"), exporter, sorted(lora.items())], default=str)
    stamp = case.folder / "case.json"
    if not force and stamp.exists() and json.loads(stamp.read_text())["key"] == key:
        return case
    case.folder.mkdir(parents=True, exist_ok=True)
    peft_model = add_lora(make_base(), targets, **lora)
    inner = peft_model.get_base_model()  # PeftModel.forward takes **kwargs, which torch.export cannot trace
    _export(inner, spec, case.lora, exporter)
    peft_model.save_pretrained(str(case.adapter))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    _export(merged, spec, case.merged, exporter)
    _export(make_base(), spec, case.base, exporter)
    atomic_write_bytes(stamp, json.dumps({"key": key}).encode())
    return case


def transformer_case(exporter: str = "dynamo", **lora: Any) -> LoraCase:
    """The zoo transformer with PEFT LoRA on attention (q, k, v, o) and MLP (fc1, fc2)."""
    from models import transformer

    spec = transformer.build_transformer()
    return build_case(
        f"transformer_{exporter}", transformer.build_base, spec, TRANSFORMER_TARGETS, exporter=exporter, **lora
    )


def minilm_case(exporter: str = "dynamo", **lora: Any) -> LoraCase:
    """all-MiniLM-L6-v2 with PEFT LoRA on every linear layer of its encoder (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from models import minilm

    spec = minilm.build_minilm()

    def make_base() -> torch.nn.Module:
        return minilm.load_encoder()

    # PEFT wraps the whole SentenceEncoder, so module names keep the "bert." prefix.
    return build_case(f"minilm_{exporter}", make_base, spec, MINILM_TARGETS, exporter=exporter, **lora)


def eval_feeds(case_name: str) -> dict[str, np.ndarray]:
    """The zoo's evaluation inputs for the model a case is built on."""
    return zoo.eval_data("minilm" if case_name.startswith("minilm") else "transformer").inputs
