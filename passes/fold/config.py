"""Options of the ``fold`` pass (apart from its code: listing passes imports no ONNX)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FoldConfig:
    """Options of the ``fold`` pass."""

    size_limit: int = field(
        default=1 << 28,
        metadata={"help": "Largest constant (elements) folding may read or create; weight-sized by default."},
    )
    iterations: int = field(default=2, metadata={"help": "Fold-and-rewrite rounds; stops early when nothing changes."})
    inline_functions: bool = field(
        default=True, metadata={"help": "Inline model-local functions first so their bodies fold too."}
    )
    shape_inference: bool = field(
        default=True, metadata={"help": "Infer shapes node by node, which lets Shape/Size-driven subgraphs fold."}
    )

    def __post_init__(self) -> None:
        if self.size_limit < 1 or self.iterations < 1:
            raise ValueError(
                f"size_limit and iterations must be at least 1; got size_limit={self.size_limit}, "
                f"iterations={self.iterations}."
            )
