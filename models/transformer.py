"""Tiny pre-LN transformer encoder, with and without LoRA adapters.

Both variants take their base weights from the same seeded generator, so
merging the adapters of ``transformer_lora`` (W + scaling * B @ A) must
reproduce :func:`merged_state_dict` exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from models.datasets import (
    TOKEN_BATCH,
    TOKEN_EVAL_SEED,
    TOKEN_SEQ,
    TOKEN_VOCAB,
    random_token_ids,
)
from models.exporter import TorchModelSpec

D_MODEL = 64
N_HEADS = 4
N_LAYERS = 2
D_FF = 256
MAX_LEN = 128

BASE_SEED = 0
LORA_SEED = 1
LORA_RANK = 8
LORA_ALPHA = 16
# Relative to PEFT's zero init: large enough that ||scaling * B @ A|| is
# roughly a quarter of ||W||, so a wrong merge shows up clearly in outputs.
LORA_B_STD = 0.08
LORA_TARGETS = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc1", "mlp.fc2")


class SelfAttention(nn.Module):
    """Explicit q/k/v/o projections so the graph shows MatMul/Softmax, not a fused op."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.o_proj = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.reshape(b, s, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.d_head)
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        return self.o_proj(ctx.transpose(1, 2).reshape(b, s, d))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(D_MODEL)
        self.attn = SelfAttention(D_MODEL, N_HEADS)
        self.ln2 = nn.LayerNorm(D_MODEL)
        self.mlp = FeedForward(D_MODEL, D_FF)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyEncoder(nn.Module):
    """Token + learned position embeddings, 2 pre-LN layers, final LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(TOKEN_VOCAB, D_MODEL)
        self.pos_emb = nn.Parameter(torch.zeros(MAX_LEN, D_MODEL))
        self.layers = nn.ModuleList(EncoderLayer() for _ in range(N_LAYERS))
        self.ln_f = nn.LayerNorm(D_MODEL)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(input_ids) + self.pos_emb[: input_ids.shape[1]]
        for layer in self.layers:
            x = layer(x)
        return self.ln_f(x)


class LoRALinear(nn.Module):
    """Mimics ``peft.tuners.lora.Linear``: y = base(x) + lora_B(lora_A(x)) * scaling."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base_layer.out_features, bias=False)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return self.base_layer.weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight)


@torch.no_grad()
def _init_base(model: TinyEncoder, gen: torch.Generator) -> None:
    """Variance-preserving init so activations are O(1) rather than near zero."""
    nn.init.normal_(model.tok_emb.weight, std=1.0, generator=gen)
    nn.init.normal_(model.pos_emb, std=0.5, generator=gen)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=1.0 / math.sqrt(module.in_features), generator=gen)
            nn.init.normal_(module.bias, std=0.02, generator=gen)
        elif isinstance(module, nn.LayerNorm):
            # Non-trivial affine params so LN handling is actually exercised.
            nn.init.normal_(module.weight, mean=1.0, std=0.1, generator=gen)
            nn.init.normal_(module.bias, std=0.05, generator=gen)


def build_base(seed: int = BASE_SEED) -> TinyEncoder:
    model = TinyEncoder()
    _init_base(model, torch.Generator().manual_seed(seed))
    return model.eval()


def _lora_parent(model: TinyEncoder, layer: int, target: str) -> tuple[nn.Module, str]:
    parent_path, attr = target.rsplit(".", 1)
    return model.layers[layer].get_submodule(parent_path), attr


@torch.no_grad()
def build_lora(seed: int = BASE_SEED, lora_seed: int = LORA_SEED) -> TinyEncoder:
    """Base model from ``seed`` with LoRA adapters drawn from an independent generator."""
    model = build_base(seed)
    gen = torch.Generator().manual_seed(lora_seed)
    for layer in range(N_LAYERS):
        for target in LORA_TARGETS:
            parent, attr = _lora_parent(model, layer, target)
            lora = LoRALinear(getattr(parent, attr), LORA_RANK, LORA_ALPHA)
            # PEFT's A init (kaiming_uniform, a=sqrt(5)) but nonzero B.
            bound = 1.0 / math.sqrt(lora.lora_A.in_features)
            nn.init.uniform_(lora.lora_A.weight, -bound, bound, generator=gen)
            nn.init.normal_(lora.lora_B.weight, std=LORA_B_STD, generator=gen)
            setattr(parent, attr, lora)
    return model.eval()


@torch.no_grad()
def merged_state_dict() -> dict[str, np.ndarray]:
    """State dict of a plain :class:`TinyEncoder` with every LoRA branch merged.

    Keys match ``build_base().state_dict()`` (e.g. ``layers.0.attn.q_proj.weight``,
    weights in torch [out, in] layout).
    """
    lora_model = build_lora()
    merged = {k: v.detach().clone() for k, v in build_base().state_dict().items()}
    for layer in range(N_LAYERS):
        for target in LORA_TARGETS:
            parent, attr = _lora_parent(lora_model, layer, target)
            merged[f"layers.{layer}.{target}.weight"] = getattr(parent, attr).merged_weight()
    return {k: v.numpy() for k, v in merged.items()}


def build_merged() -> TinyEncoder:
    """Plain encoder loaded with :func:`merged_state_dict` (reference for merge tests)."""
    model = TinyEncoder()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in merged_state_dict().items()})
    return model.eval()


def _spec(module: TinyEncoder, lora: bool) -> TorchModelSpec:
    rng = np.random.default_rng(TOKEN_EVAL_SEED)
    return TorchModelSpec(
        module=module,
        # Batch/seq 2 and 8: size-1 example dims would be specialized to constants.
        example_inputs={"input_ids": random_token_ids(np.random.default_rng(0), 2, 8)},
        output_names=("hidden",),
        dynamic_axes={"input_ids": {0: "batch", 1: "seq"}},
        dim_max={"seq": MAX_LEN},
        check_inputs={"input_ids": random_token_ids(rng, TOKEN_BATCH, TOKEN_SEQ)},
        metadata={
            "d_model": D_MODEL,
            "n_layers": N_LAYERS,
            "n_heads": N_HEADS,
            "max_seq": MAX_LEN,
            **({"lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "targets": list(LORA_TARGETS)}} if lora else {}),
        },
    )


def build_transformer() -> TorchModelSpec:
    return _spec(build_base(), lora=False)


def build_transformer_lora() -> TorchModelSpec:
    return _spec(build_lora(), lora=True)
