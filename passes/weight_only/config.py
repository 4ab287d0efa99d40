"""Options of the ``weight_only`` pass and the same-size alternatives the accuracy fallback tries."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

FLOAT_FORMATS = ("nf4", "fp4")


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Options of the ``weight_only`` pass."""

    format: Literal["matmul_nbits", "qdq", "nf4", "fp4"] = field(
        default="matmul_nbits",
        metadata={
            "help": "matmul_nbits: com.microsoft.MatMulNBits (ONNX Runtime CPU/GPU); qdq: standard blocked "
            "DequantizeLinear -> MatMul (opset 21; ORT's CPU EP fuses it into MatMulNBits); nf4/fp4: QLoRA "
            "4-bit floats in com.microsoft.MatMulBnb4."
        },
    )
    bits: Literal[4, 8] = field(default=4, metadata={"help": "Bits per weight for matmul_nbits/qdq (nf4/fp4: 4)."})
    block_size: int | None = field(
        default=None,
        metadata={
            "help": "Weights per scale along the input axis: a power of two >= 16, or 0 for one scale per "
            "output channel. Default: 32 (int formats), 64 (nf4/fp4, as QLoRA)."
        },
    )
    symmetric: bool = field(
        default=True,
        metadata={"help": "Signed codes without zero point; false: unsigned codes with a zero point per block."},
    )
    method: Literal["rtn", "gptq", "auto"] = field(
        default="rtn",
        metadata={
            "help": "rtn: round to nearest; gptq: error-compensating row-by-row update from calibration "
            "activations (needs calibration data); auto: gptq when calibration data is given, rtn otherwise."
        },
    )
    clip_search: bool = field(
        default=True,
        metadata={"help": "Per block, shrink the range if that lowers the block's reconstruction error."},
    )
    clip_min: float = field(default=0.8, metadata={"help": "Smallest range shrink factor the clip search tries."})
    clip_steps: int = field(default=8, metadata={"help": "Shrink factors tried between 1.0 and clip_min."})
    gptq_damp: float = field(default=0.01, metadata={"help": "GPTQ dampening: fraction of mean(diag H) added to H."})
    act_order: bool = field(
        default=True,
        metadata={
            "help": "GPTQ: quantize input rows by decreasing activation energy (diag H) instead of in storage "
            "order; block scales stay where they are."
        },
    )
    double_quant: bool = field(
        default=True, metadata={"help": "nf4/fp4: store block absmax in 8 bits, groups of 256 (QLoRA)."}
    )
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = field(
        default=None,
        metadata={
            "help": "MatMulNBits accuracy_level: 4 lets the CPU kernel quantize activations to int8 per block "
            "(~1.4x faster at batch 1, slower at large batches without VNNI); 0 computes in float. Default: "
            "0 for 4 bits, 4 for 8 bits (the 8-bit float kernel is several times slower than float32)."
        },
    )
    scale_type: Literal["float16", "float32"] = field(
        default="float16",
        metadata={"help": "How scales are stored; float16 (Cast to float32 at load) keeps int4 at 4.5 bits/weight."},
    )
    op_types: tuple[str, ...] = field(
        default=("MatMul", "Gemm", "Gather"), metadata={"help": "Op types whose constant weights are quantized."}
    )
    exclude: tuple[str, ...] = field(
        default=(), metadata={"help": "Node or weight names to leave in float; shell patterns like 'fc*' work."}
    )
    exclude_op_types: tuple[str, ...] = field(default=(), metadata={"help": "Op types to leave in float."})
    embedding_bits: Literal[4, 8] | None = field(
        default=None,
        metadata={
            "help": "Bits of embedding tables (Gather), when not those of the MatMuls (bits); 8 keeps them closer. "
            "With tied: the bits of the tied table and LM head, one copy for both."
        },
    )
    awq: bool = field(
        default=False,
        metadata={
            "help": "With calibration data (GPTQ's Hessians): scale each layer input's weight rows by its activation "
            "energy to a power chosen by the predicted output error (AWQ), where 1/s folds exactly into a "
            "normalization's scale or a gated product's MatMul; then round (GPTQ or to nearest)."
        },
    )
    mixed_share: float = field(
        default=0.0,
        metadata={
            "help": "4-bit int formats: share of the MatMul/Gemm parameters stored at 8 bits instead, the layers "
            "whose 4-bit rounding loses most of their output per parameter (Hessian-weighted with calibration "
            "data). The accuracy fallback raises it (0.1, 0.25, 0.5) before it leaves any layer in float."
        },
    )
    tied: bool = field(
        default=False,
        metadata={
            "help": "Quantize a weight that is both an embedding table (Gather of its Transpose) and a MatMul's "
            "(a tied LM head) once, for both readers; off by default: on SmolLM2 the int4 table raised perplexity "
            "more than it saved (bench/bench_llm.py)."
        },
    )

    def __post_init__(self) -> None:
        size = self.block_size
        if size is not None and size != 0 and (size < 16 or size & (size - 1)):
            raise ValueError(f"block_size must be 0 (per output channel) or a power of two >= 16; got {size}.")
        if self.format in FLOAT_FORMATS and self.bits != 4:
            raise ValueError(f"format {self.format!r} stores 4-bit floats; set bits: 4 (got {self.bits}).")
        if self.format in FLOAT_FORMATS and size == 0:
            raise ValueError(f"format {self.format!r} needs blocks along K; block_size 0 is for matmul_nbits/qdq.")
        if not 0.0 < self.clip_min <= 1.0:
            raise ValueError(f"clip_min must be in (0, 1]; got {self.clip_min}.")
        if self.clip_steps < 1:
            raise ValueError(f"clip_steps must be >= 1; got {self.clip_steps}.")
        if not 0.0 <= self.mixed_share <= 1.0:
            raise ValueError(f"mixed_share must be between 0 and 1; got {self.mixed_share}.")
        if self.mixed_share and (self.bits != 4 or self.format in FLOAT_FORMATS):
            raise ValueError(
                "mixed_share stores some 4-bit integer layers at 8 bits; it needs bits: 4 and format "
                f"matmul_nbits or qdq (got bits {self.bits}, format {self.format!r})."
            )
        if self.awq and self.format in FLOAT_FORMATS:
            raise ValueError(f"awq searches its scales on the integer grid; format {self.format!r} is not one.")
        if self.gptq_damp <= 0:
            raise ValueError(f"gptq_damp must be > 0; got {self.gptq_damp}.")

    @property
    def needs_data(self) -> bool:
        """GPTQ updates weights from calibration activations; round-to-nearest reads none."""
        return self.method == "gptq"

    @property
    def without_data(self) -> str:
        """What the pass does differently when no calibration data is given (said before it runs)."""
        if self.method == "gptq" or (self.method == "rtn" and not self.awq):
            return ""
        wanted = "GPTQ and AWQ" if self.method == "auto" and self.awq else "GPTQ" if self.method == "auto" else "AWQ"
        return f"weight_only rounds to nearest; give --calib DATA (token windows, for a language model) for {wanted}"

    @property
    def uses_hessians(self) -> bool:
        """Whether calibration Hessians are collected when data is given (for GPTQ, or AWQ's search)."""
        return self.method in ("gptq", "auto") or self.awq

    @property
    def runs_gptq(self) -> bool:
        """Whether GPTQ rounds the weights when Hessians are given."""
        return self.method in ("gptq", "auto")

    @property
    def kernel_accuracy_level(self) -> int:
        """The MatMulNBits accuracy_level written (``accuracy_level`` with its default resolved)."""
        return self.kernel_accuracy_level_for(self.bits)

    def kernel_accuracy_level_for(self, bits: int) -> int:
        """The accuracy_level of a ``bits``-wide MatMulNBits (an 8-bit tied LM head in a 4-bit model too)."""
        if self.accuracy_level is not None:
            return self.accuracy_level
        return 4 if bits == 8 else 0

    @property
    def default_block(self) -> int:
        if self.block_size is not None:
            return self.block_size
        return 64 if self.format in FLOAT_FORMATS else 32

    def block_for(self, k: int) -> int:
        """The block size used for a reduction of length ``k`` (per channel: a power of two >= k)."""
        return self.default_block or max(16, 1 << (max(k, 1) - 1).bit_length())

    def clip_ratios(self) -> tuple[float, ...]:
        if not self.clip_search or self.clip_min >= 1.0:
            return (1.0,)
        import numpy as np  # options load without numpy: `graphopt passes` stays fast

        return tuple(float(r) for r in np.linspace(1.0, self.clip_min, self.clip_steps))


def method_alternatives(config: WeightOnlyConfig) -> list[WeightOnlyConfig]:
    """GPTQ for round-to-nearest: same format, size and speed, for the accuracy fallback (needs calibration data)."""
    return [replace(config, method="gptq")] if config.method == "rtn" else []


# Shares of the MatMul parameters the accuracy fallback stores at 8 bits, tried in order.
MIXED_SHARES = (0.1, 0.25, 0.5)


def wider_alternatives(config: WeightOnlyConfig) -> list[WeightOnlyConfig]:
    """The same 4-bit config with more of its MatMul parameters at 8 bits (mixed precision), least first: the
    accuracy fallback tries them before it leaves any layer in float (``[]`` where ``mixed_share`` cannot apply)."""
    if config.bits != 4 or config.format in FLOAT_FORMATS:
        return []
    return [replace(config, mixed_share=share) for share in MIXED_SHARES if share > config.mixed_share]
