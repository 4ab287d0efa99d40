"""Options of ``merge_lora`` and ``unmerge_lora`` (apart from their code: listing passes imports no ONNX)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from graphopt.errors import RecipeError


@dataclass(frozen=True)
class AdapterOptions:
    """Options shared by ``merge_lora`` and ``unmerge_lora``: which adapters, and how they map."""

    pass_name: ClassVar[str] = "merge_lora"
    adapters: tuple[str, ...] = field(
        default=(),
        metadata={"help": "PEFT adapter folders (adapter_config.json + adapter_model.safetensors)."},
    )
    weights: tuple[float, ...] = field(
        default=(), metadata={"help": "One weight per adapter (to unmerge: the weights merged); 1.0 each by default."}
    )
    combination: Literal["linear", "cat"] = field(
        default="linear",
        metadata={
            "help": "How several adapters combine: linear = PEFT add_weighted_adapter 'linear' (weighted sums "
            "of A and of B, equal ranks); cat = the exact weighted sum of the updates."
        },
    )
    mapping: dict[str, str] = field(
        default_factory=dict,
        metadata={"help": "PEFT module -> ONNX node or weight initializer name, where the names do not match."},
    )
    mapping_file: str | None = field(default=None, metadata={"help": "JSON file with more mapping entries."})
    allow_unmatched: bool = field(
        default=False, metadata={"help": "Merge the modules that match and report the rest instead of failing."}
    )

    def __post_init__(self) -> None:
        name = self.pass_name
        if self.weights and len(self.weights) != len(self.adapters):
            raise RecipeError(
                f"{name}: weights has {len(self.weights)} value(s) for {len(self.adapters)} adapter(s); "
                "give one weight per adapter, or none for 1.0 each."
            )
        if name == "unmerge_lora" and not self.adapters:
            raise RecipeError("unmerge_lora: adapters is empty; give the adapter folder(s) that were merged.")


@dataclass(frozen=True)
class UnmergeLoraConfig(AdapterOptions):
    """Options of the ``unmerge_lora`` pass."""

    pass_name: ClassVar[str] = "unmerge_lora"


@dataclass(frozen=True)
class MergeLoraConfig(AdapterOptions):
    """Options of the ``merge_lora`` pass."""

    in_graph: bool = field(default=True, metadata={"help": "Merge LoRA branches left in the graph by the exporter."})
    shared_weights: Literal["skip", "copy"] = field(
        default="skip",
        metadata={
            "help": "A base weight other nodes read too: skip leaves its LoRA alone (an adapter module then fails); "
            "copy gives the op its own merged copy."
        },
    )
    quantized: Literal["requantize", "keep_branch"] = field(
        default="requantize",
        metadata={
            "help": "Quantized base weights (DequantizeLinear, MatMulNBits, MatMulBnb4): requantize = dequantize, "
            "add the update, quantize again in the same format; keep_branch = keep the LoRA in float beside it."
        },
    )
