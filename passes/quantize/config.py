"""Options of the ``quantize`` pass and the same-size alternatives the accuracy fallback tries."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from graphopt import hardware

DEFAULT_OPS = (
    "Conv", "MatMul", "Gemm", "Add", "Mul", "Relu", "Clip", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
    "Concat", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Gather", "Resize", "Sigmoid", "LeakyRelu",
)  # fmt: skip


@dataclass(frozen=True)
class QuantizeConfig:
    """Options of the ``quantize`` pass."""

    mode: Literal["auto", "static", "dynamic"] = field(
        default="auto",
        metadata={
            "help": "static: calibrated Q/DQ; dynamic: int8 MatMul weights, activation scales at run time; "
            "auto: static when calibration data is given, else dynamic."
        },
    )
    activation_type: Literal["uint8", "int8", "uint16", "int16"] = field(
        default="uint8",
        metadata={"help": "Activation integer type; uint8 fuses best on ORT CPU (QLinearAdd needs it)."},
    )
    weight_type: Literal["int8", "uint8"] = field(default="int8", metadata={"help": "Weight integer type."})
    activation_symmetric: bool = field(
        default=False, metadata={"help": "Symmetric activations (zero point 0); asymmetric lets ReLU fold into the Q."}
    )
    weight_symmetric: bool = field(default=True, metadata={"help": "Symmetric weights: exact zeros stay zero."})
    per_channel: bool = field(default=True, metadata={"help": "One weight scale per output channel."})
    reduce_range: bool | Literal["auto"] = field(
        default="auto",
        metadata={
            "help": "7-bit weights, avoiding int16 saturation in ORT's u8s8 kernels on x86 without VNNI; "
            "auto: when this CPU lacks VNNI."
        },
    )
    method: Literal["minmax", "percentile", "entropy", "mse"] = field(
        default="percentile", metadata={"help": "How calibration picks each activation's clipping range."}
    )
    percentile: float = field(default=99.999, metadata={"help": "Percentile of |x| kept, for method=percentile."})
    smooth: bool = field(
        default=True,
        metadata={
            "help": "SmoothQuant: a MatMul input's large channels scaled down and the weight rows scaled up as much "
            "(exact in float), per tensor where the predicted int8 error falls; the exponent chosen per tensor."
        },
    )
    rounding: Literal["gptq", "nearest"] = field(
        default="gptq",
        metadata={
            "help": "How weights become integers (static mode): gptq rounds a layer's inputs one at a time and "
            "moves each error onto those not yet rounded, for the least output error on the calibration data "
            "(per-channel scales unchanged); nearest rounds each weight alone."
        },
    )
    op_types: tuple[str, ...] = field(default=DEFAULT_OPS, metadata={"help": "Op types to quantize."})
    exclude_op_types: tuple[str, ...] = field(default=(), metadata={"help": "Op types to leave in float."})
    exclude: tuple[str, ...] = field(
        default=(), metadata={"help": "Node or weight names to leave in float; shell patterns like 'fc*' work."}
    )
    exclude_tensors: tuple[str, ...] = field(
        default=(), metadata={"help": "Activation tensors to leave unquantized (what the accuracy fallback sets)."}
    )
    embeddings: bool = field(
        default=True,
        metadata={"help": "Store constant tables read by Gather (per-row scales) or Slice (one scale) as int8."},
    )
    islands: bool = field(
        default=True,
        metadata={
            "help": "Quantize non-compute ops only between quantized ops, and compute outputs only when a "
            "quantized op reads them (False: every listed op and every output, as ORT does)."
        },
    )
    max_abs_range: float = field(
        default=65504.0,
        metadata={
            "help": "Leave in float any activation whose calibrated range passes this (attention-mask sentinels)."
        },
    )
    tensor_types: dict[str, str] = field(
        default_factory=dict, metadata={"help": "Per-tensor activation type overrides, e.g. {attn_scores: uint16}."}
    )
    outliers: float = field(
        default=3.0,
        metadata={
            "help": "MatMul input channels whose calibrated max |x| passes this many times that of the largest "
            "channel outside the top 1/64 are multiplied in float beside the int8 product, so they no longer "
            "set the int8 scale (LLM.int8-style); only for MatMuls whose output stays float (never with "
            "islands=false); 0 disables."
        },
    )

    @property
    def needs_data(self) -> bool:
        """Static mode calibrates activation ranges; auto goes dynamic without data."""
        return self.mode == "static"

    @property
    def without_data(self) -> str:
        """What the pass does differently when no calibration data is given (said before it runs)."""
        if self.mode != "auto":
            return ""
        return "quantize runs in dynamic mode: MatMul weights only, convolutions stay float; give --calib DATA for int8"


def resolve_reduce_range(config: QuantizeConfig) -> bool:
    """``reduce_range`` with "auto" decided for this CPU (only int8 weights can saturate)."""
    if config.reduce_range == "auto":
        return config.weight_type == "int8" and hardware.u8s8_saturates()
    return bool(config.reduce_range)


FALLBACK_METHODS = ("percentile", "mse")  # what the accuracy fallback tries before float layers


def range_alternatives(config: QuantizeConfig) -> list[QuantizeConfig]:
    """The same quantization with other ranges (same speed and size), for the accuracy fallback.

    7-bit weights first where 8-bit ones saturate ORT's kernels on this CPU, then the other
    clipping methods.
    """
    if config.mode == "dynamic":
        return []
    alternatives = []
    if config.reduce_range is False and config.weight_type == "int8" and hardware.u8s8_saturates():
        alternatives.append(dataclasses.replace(config, reduce_range="auto"))
    return alternatives + [dataclasses.replace(config, method=m) for m in FALLBACK_METHODS if m != config.method]


def fusing_alternatives(config: QuantizeConfig) -> list[QuantizeConfig]:
    """The same quantization with every listed op and output quantized (``islands=False``), for the latency budget.

    Integer islands leave a compute op's output in float when no quantized op reads it; ONNX
    Runtime then cannot fuse that op into an integer kernel (e.g. a Conv feeding HardSigmoid·Mul),
    and its Q/DQ only add work. Quantizing everything, as ORT's own quantizer does, lets more of
    them fuse, at some cost in accuracy that the budget checks. Static mode only.
    """
    if config.mode == "dynamic" or not config.islands:
        return []
    return [dataclasses.replace(config, islands=False, outliers=0.0)]


def min_opset(config: QuantizeConfig) -> int:
    """Per-channel Q/DQ needs opset 13, 16-bit Q/DQ types opset 21."""
    return 21 if any(t.endswith("16") for t in (config.activation_type, *config.tensor_types.values())) else 13
