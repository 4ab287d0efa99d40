"""Pretrained all-MiniLM-L6-v2 with sentence-transformers pooling baked in."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from models.datasets import eval_sentences, minilm_model_dir, tokenize
from models.exporter import TorchModelSpec

logger = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
# ORT's fused LayerNorm/Softmax kernels accumulate differently from torch;
# 6 layers of that stays well under this bound on the eval sentences.
ATOL = 1e-4


class SentenceEncoder(nn.Module):
    """BertModel -> (last_hidden_state, mean-pooled L2-normalised sentence_embedding).

    Mirrors sentence-transformers' Pooling(mean) + Normalize modules, so the
    second output equals ``SentenceTransformer.encode(..., normalize=False)``.
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
        return hidden, nn.functional.normalize(pooled, p=2.0, dim=1)


def load_encoder() -> SentenceEncoder:
    """Load the bundled weights offline; raises ImportError if the package is missing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel

    # Eager attention gives plain MatMul/Softmax nodes instead of an SDPA decomposition.
    bert = AutoModel.from_pretrained(str(minilm_model_dir()), attn_implementation="eager")
    return SentenceEncoder(bert).eval()


def build_minilm() -> TorchModelSpec:
    sentences = eval_sentences()
    # Two sentences of different length so the example has real padding.
    example = tokenize([sentences[0], sentences[3]])
    return TorchModelSpec(
        module=load_encoder(),
        example_inputs=example,
        output_names=("last_hidden_state", "sentence_embedding"),
        dynamic_axes={name: {0: "batch", 1: "seq"} for name in INPUT_NAMES},
        # BERT's position table has 512 rows.
        dim_max={"seq": 512},
        check_inputs=tokenize(sentences),
        atol=ATOL,
        metadata={"pretrained": "sentence-transformers/all-MiniLM-L6-v2", "hidden_size": 384},
    )
