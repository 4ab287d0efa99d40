"""Options of the single-module passes (``fp16``, ``tune``), apart from their code: listing passes imports no ONNX."""

from __future__ import annotations

from dataclasses import dataclass, field

FP16_MAX = 65504.0
# Kept in float32 by default: reductions and normalisations accumulate over many values,
# Softmax/exp-like ops overflow early, Resize/Range/shape arithmetic take exact scales.
DEFAULT_BLOCKED = (
    "ReduceSum", "ReduceMean", "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare", "ReduceProd", "Softmax", "LogSoftmax",
    "Exp", "Pow", "Resize", "Upsample", "Range", "CumSum", "TopK", "NonMaxSuppression", "RandomNormal",
    "RandomNormalLike", "RandomUniform", "RandomUniformLike", "EyeLike", "Multinomial", "Bernoulli",
)  # fmt: skip


@dataclass(frozen=True)
class Fp16Config:
    """Options of the ``fp16`` pass."""

    keep_io_types: bool = field(
        default=True, metadata={"help": "Keep graph inputs and outputs in float32 (Casts at the edges)."}
    )
    exclude_op_types: tuple[str, ...] = field(default=DEFAULT_BLOCKED, metadata={"help": "Op types kept in float32."})
    exclude: tuple[str, ...] = field(
        default=(), metadata={"help": "Node or weight names kept in float32; shell patterns like 'fc*' work."}
    )
    max_abs: float = field(
        default=0.5 * FP16_MAX,
        metadata={"help": "With calibration data: nodes touching values beyond this magnitude stay float32."},
    )


@dataclass(frozen=True)
class TuneConfig:
    """Options of the ``tune`` pass."""

    min_gain: float = field(default=0.02, metadata={"help": "Keep a rewrite only if it is at least this much faster."})
    runs: int = field(default=20, metadata={"help": "Timed runs per variant (interleaved, medians)."})
    threads: int | None = field(default=1, metadata={"help": "ONNX Runtime threads while timing (None: ORT default)."})
    device: str = field(default="cpu", metadata={"help": "Device to tune for: cpu or cuda."})
