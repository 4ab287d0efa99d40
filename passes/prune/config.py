"""Options of the pruning passes and the same-size alternatives the accuracy fallback tries."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # options load without onnx_ir: `graphopt passes` stays fast
    import onnx_ir as ir

PRUNABLE_OPS = ("MatMul", "Gemm", "Conv")


@dataclass(frozen=True)
class PruneConfig:
    """Options of the ``prune`` pass."""

    pattern: str = field(
        default="unstructured",
        metadata={
            "help": "unstructured: any weights; n:m keeps n of every m along the reduction axis (options n, m), "
            "also written as the numbers: pattern=2:4 (what GPUs accelerate)."
        },
    )
    sparsity: float = field(default=0.5, metadata={"help": "Fraction of weights set to zero, for unstructured."})
    n: int = field(default=2, metadata={"help": "Weights kept in each group of m, for pattern n:m."})
    m: int = field(default=4, metadata={"help": "Group size along the reduction axis, for pattern n:m."})
    method: Literal["magnitude", "wanda", "sparsegpt"] = field(
        default="magnitude",
        metadata={
            "help": "magnitude: |W|; wanda: |W| x input norm (calibration); "
            "sparsegpt: Hessian-based, updates kept weights (calibration)."
        },
    )
    scope: Literal["layer", "global"] = field(
        default="layer",
        metadata={"help": "Unstructured sparsity per layer, or one magnitude threshold over all layers (global)."},
    )
    op_types: tuple[str, ...] = field(default=PRUNABLE_OPS, metadata={"help": "Op types whose weights are pruned."})
    exclude: tuple[str, ...] = field(
        default=(), metadata={"help": "Node or weight names to leave dense; shell patterns like 'fc*' work."}
    )
    exclude_op_types: tuple[str, ...] = field(default=(), metadata={"help": "Op types to leave dense."})
    block_size: int = field(default=128, metadata={"help": "SparseGPT: columns pruned per block."})
    damp: float = field(default=0.01, metadata={"help": "SparseGPT: Hessian damping, a fraction of its mean diagonal."})

    def __post_init__(self) -> None:
        problems = []
        numbers = re.fullmatch(r"(\d+):(\d+)", self.pattern)
        if numbers:  # pattern=2:4 is pattern=n:m with n=2, m=4
            object.__setattr__(self, "n", int(numbers[1]))
            object.__setattr__(self, "m", int(numbers[2]))
            object.__setattr__(self, "pattern", "n:m")
        elif self.pattern not in ("unstructured", "n:m"):
            problems.append(f"pattern must be 'unstructured', 'n:m' or numbers such as '2:4'; got {self.pattern!r}")
        if not 0.0 <= self.sparsity < 1.0:
            problems.append(f"sparsity must be in [0, 1); got {self.sparsity}")
        if not 0 < self.n < self.m:
            problems.append(f"n:m needs 0 < n < m; got n={self.n}, m={self.m}")
        if self.scope == "global" and self.method != "magnitude":
            problems.append(
                f"scope=global compares magnitudes across layers; it needs method=magnitude, not {self.method}"
            )
        if self.scope == "global" and self.pattern != "unstructured":
            problems.append("scope=global applies to pattern=unstructured only")
        if self.block_size < 1:
            problems.append(f"block_size must be >= 1; got {self.block_size}")
        if not self.damp > 0.0:
            problems.append(f"damp must be > 0; got {self.damp}")
        unknown = sorted(set(self.op_types) - set(PRUNABLE_OPS))
        if unknown:
            problems.append(f"op_types {unknown} cannot be pruned; choose from {', '.join(PRUNABLE_OPS)}")
        if problems:
            raise ValueError("; ".join(problems) + ".")

    @property
    def needs_data(self) -> bool:
        return self.method != "magnitude"


def prune_method_alternatives(config: PruneConfig) -> list[PruneConfig]:
    """Calibrated methods at the same sparsity (same size and speed), for the accuracy fallback."""
    if config.scope != "layer":
        return []
    order = ("magnitude", "wanda", "sparsegpt")
    return [dataclasses.replace(config, method=m) for m in order[order.index(config.method) + 1 :]]


KINDS = ("conv", "mlp", "heads")


@dataclass(frozen=True)
class PruneStructuredConfig:
    """Options of the ``prune_structured`` pass."""

    ratio: float = field(default=0.5, metadata={"help": "Fraction of each group's channels to remove."})
    kinds: tuple[str, ...] = field(
        default=KINDS, metadata={"help": "Groups to prune: conv (channels), mlp (neurons), heads (attention heads)."}
    )
    importance: Literal["weight", "activation"] = field(
        default="weight",
        metadata={
            "help": "weight: L2 norms of the weights around each channel; "
            "activation: each channel's contribution to the next layer on calibration data."
        },
    )
    recover: bool = field(
        default=False,
        metadata={"help": "Re-fit the next layer by least squares on calibration data (no training)."},
    )
    ridge: float = field(
        default=0.1, metadata={"help": "Re-fit regularisation towards the current weights, relative to mean X^T X."}
    )
    residual: Literal["together", "skip"] = field(
        default="together",
        metadata={"help": "Channels tied by a residual Add: prune all their producers together, or skip the group."},
    )
    round_to: int = field(
        default=8,
        metadata={
            "help": "Keep widths that are multiples of this; ONNX Runtime's CPU convolutions slow down on others."
        },
    )
    exclude: tuple[str, ...] = field(
        default=(), metadata={"help": "Producer node or weight names to leave whole; shell patterns work."}
    )
    exclude_op_types: tuple[str, ...] = field(default=(), metadata={"help": "Producer op types to leave whole."})

    def __post_init__(self) -> None:
        problems = []
        if not 0.0 <= self.ratio < 1.0:
            problems.append(f"ratio must be in [0, 1); got {self.ratio}")
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            problems.append(f"kinds {unknown} are unknown; choose from {', '.join(KINDS)}")
        if self.ridge < 0:
            problems.append(f"ridge must be >= 0; got {self.ridge}")
        if self.round_to < 1:
            problems.append(f"round_to must be >= 1; got {self.round_to}")
        if problems:
            raise ValueError("; ".join(problems) + ".")

    @property
    def needs_data(self) -> bool:
        return self.recover or self.importance == "activation"

    def excluded(self, node: ir.Node) -> bool:
        from graphopt.passes.edit import excluded

        return excluded(node, self.exclude, self.exclude_op_types)
