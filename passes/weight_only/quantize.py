"""Weight-only quantization: MatMul/Gemm/Gather weights in 4 or 8 bits, activations left in float."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import onnx_ir as ir

from graphopt.numerics.blocks import IntBlocks, quantize_int_blocks
from graphopt.numerics.nf4 import Bnb4Blocks, quantize_bnb4
from graphopt.passes import edit
from graphopt.passes.weight_only import gptq as gptq_module
from graphopt.passes.weight_only.kernels import ort_notes, predict_kernels
from graphopt.passes.weight_only.lower import MS_DOMAIN, Lowering, raise_opset

logger = logging.getLogger(__name__)

_FLOAT_FORMATS = ("nf4", "fp4")
collect_hessians = gptq_module.collect_hessians


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
    method: Literal["rtn", "gptq"] = field(
        default="rtn",
        metadata={
            "help": "rtn: round to nearest; gptq: error-compensating row-by-row update from calibration "
            "activations (needs calibration data)."
        },
    )
    clip_search: bool = field(
        default=True,
        metadata={"help": "Per block, shrink the range if that lowers the block's reconstruction error."},
    )
    clip_min: float = field(default=0.8, metadata={"help": "Smallest range shrink factor the clip search tries."})
    clip_steps: int = field(default=8, metadata={"help": "Shrink factors tried between 1.0 and clip_min."})
    gptq_damp: float = field(default=0.01, metadata={"help": "GPTQ dampening: fraction of mean(diag H) added to H."})
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
    exclude_nodes: tuple[str, ...] = field(default=(), metadata={"help": "Node names to leave in float."})

    def __post_init__(self) -> None:
        size = self.block_size
        if size is not None and size != 0 and (size < 16 or size & (size - 1)):
            raise ValueError(f"block_size must be 0 (per output channel) or a power of two >= 16; got {size}.")
        if self.format in _FLOAT_FORMATS and self.bits != 4:
            raise ValueError(f"format {self.format!r} stores 4-bit floats; set bits: 4 (got {self.bits}).")
        if self.format in _FLOAT_FORMATS and size == 0:
            raise ValueError(f"format {self.format!r} needs blocks along K; block_size 0 is for matmul_nbits/qdq.")
        if not 0.0 < self.clip_min <= 1.0:
            raise ValueError(f"clip_min must be in (0, 1]; got {self.clip_min}.")
        if self.clip_steps < 1:
            raise ValueError(f"clip_steps must be >= 1; got {self.clip_steps}.")
        if self.gptq_damp <= 0:
            raise ValueError(f"gptq_damp must be > 0; got {self.gptq_damp}.")

    @property
    def kernel_accuracy_level(self) -> int:
        """The MatMulNBits accuracy_level written (``accuracy_level`` with its default resolved)."""
        if self.accuracy_level is not None:
            return self.accuracy_level
        return 4 if self.bits == 8 else 0

    @property
    def default_block(self) -> int:
        if self.block_size is not None:
            return self.block_size
        return 64 if self.format in _FLOAT_FORMATS else 32

    def block_for(self, k: int) -> int:
        """The block size used for a reduction of length ``k`` (per channel: a power of two >= k)."""
        return self.default_block or max(16, 1 << (max(k, 1) - 1).bit_length())

    def clip_ratios(self) -> tuple[float, ...]:
        if not self.clip_search or self.clip_min >= 1.0:
            return (1.0,)
        return tuple(float(r) for r in np.linspace(1.0, self.clip_min, self.clip_steps))


@dataclass(frozen=True)
class Layer:
    """One constant weight to quantize and the node that reads it.

    ``k`` is the reduction length (the blocked axis) and ``n`` the other one; ``transposed``
    says the weight is stored ``[n, k]`` (Gemm with transB, embedding tables ``[V, D]``).
    """

    node: ir.Node
    weight: ir.Value
    kind: Literal["matmul", "gemm", "gather"]
    k: int
    n: int
    transposed: bool
    activation: ir.Value | None


def plan_layers(graph: ir.Graph, config: WeightOnlyConfig) -> tuple[list[Layer], dict[str, int]]:
    """Main-graph layers the pass will quantize, and why others were skipped (reason -> count)."""
    layers: list[Layer] = []
    skipped: Counter[str] = Counter()
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in config.op_types:
            continue
        if node.name and node.name in config.exclude_nodes:
            skipped["excluded by name"] += 1
            continue
        layer, reason = _match(node, config)
        if layer is not None:
            layers.append(layer)
        elif reason:
            logger.debug("weight_only: %s (%s) left in float: %s", node.name, node.op_type, reason)
            skipped[reason] += 1
    # A weight that some other op (or a subgraph, or the graph output) reads stays in float for it
    # anyway: quantizing its other readers would store it twice.
    readers: dict[str, set[int]] = {}
    for layer in layers:
        readers.setdefault(layer.weight.name, set()).add(id(layer.node))
    kept = []
    for layer in layers:
        value = layer.weight
        if value.is_graph_output() or any(id(use.node) not in readers[value.name] for use in value.uses()):
            logger.debug("weight_only: %s left in float: %s is also read by other ops", layer.node.name, value.name)
            skipped["weight also read by other ops"] += 1
        else:
            kept.append(layer)
    return kept, dict(skipped)


def _constant_float_matrix(value: ir.Value | None) -> bool:
    return (
        value is not None
        and value.const_value is not None
        and value.const_value.dtype == ir.DataType.FLOAT
        and len(value.const_value.shape) == 2
    )


def _match(node: ir.Node, config: WeightOnlyConfig) -> tuple[Layer | None, str | None]:
    inputs = list(node.inputs)
    if node.op_type == "Gather":
        table = inputs[0] if inputs else None
        if not _constant_float_matrix(table) or node.attributes.get_int("axis", 0) != 0:
            return None, None  # not an embedding lookup
        v, d = table.const_value.shape  # type: ignore[union-attr]
        return Layer(node, table, "gather", d, v, True, None), None  # type: ignore[arg-type]
    weight = inputs[1] if len(inputs) > 1 else None
    activation = inputs[0] if inputs else None
    if not _constant_float_matrix(weight):
        return None, "weight is not a constant float32 matrix"
    if activation is None or activation.const_value is not None or (activation.shape and len(activation.shape) < 2):
        return None, "input A is constant or not a matrix"
    if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
        return None, "Gemm with transA"
    trans_b = node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))
    rows, cols = weight.const_value.shape  # type: ignore[union-attr]
    k, n = (cols, rows) if trans_b else (rows, cols)
    if config.format in _FLOAT_FORMATS and k % config.block_for(k):
        return None, f"K not a multiple of the {config.format} block size"
    kind = "gemm" if node.op_type == "Gemm" else "matmul"
    return Layer(node, weight, kind, k, n, trans_b, activation), None  # type: ignore[arg-type]


@dataclass
class _Tally:
    """Running totals for the pass's details."""

    layers: Counter[str] = field(default_factory=Counter)
    params: Counter[str] = field(default_factory=Counter)
    bytes_after: Counter[str] = field(default_factory=Counter)
    bytes_before: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, object]] = field(default_factory=list)


def method_alternatives(config: WeightOnlyConfig) -> list[WeightOnlyConfig]:
    """GPTQ for round-to-nearest: same format, size and speed, for the accuracy fallback (needs calibration data)."""
    return [replace(config, method="gptq")] if config.method == "rtn" else []


class WeightOnlyQuantizePass(ir.passes.InPlacePass):
    """Store MatMul/Gemm weights and embedding tables in 4 or 8 bits while activations stay in float.

    Weights are quantized in blocks along the reduction axis (INT4/INT8, symmetric or with
    zero points, or QLoRA's NF4/FP4 with double-quantized scales), by round-to-nearest with
    a per-block clip search or by GPTQ from calibration Hessians, and written as
    com.microsoft.MatMulNBits, a standard blocked DequantizeLinear (opset raised to 21 after
    checking every op) or com.microsoft.MatMulBnb4; embedding tables become
    com.microsoft.GatherBlockQuantized. Gemm becomes the MatMul form plus an Add of its
    bias. Graph inputs/outputs keep their names, shapes and types; weights that are not
    constant float32 matrices (already quantized ones included) are left alone. Only the
    main graph is rewritten; subgraphs and functions are left alone. Weights held in
    external data are read and released one at a time.

    Attributes:
        config: The pass options.
        hessians: ``X^T X / n`` per layer input name (from :func:`collect_hessians`), for GPTQ.
    """

    def __init__(self, config: WeightOnlyConfig, hessians: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self.config = config
        self.hessians = dict(hessians or {})
        self.details: dict[str, object] = {}
        self._inverses: dict[str, np.ndarray | None] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._inverses = {}
        if self.config.method == "gptq" and not self.hessians:
            logger.info("weight_only: method gptq without Hessians; falling back to round-to-nearest")
        layers, skipped = plan_layers(model.graph, self.config)
        if not layers:
            self.details = {"layers": 0, "skipped": skipped}
            return ir.passes.PassResult(model, modified=False)
        opset_from = raise_opset(model) if self.config.format == "qdq" else None
        lowering = Lowering(model.graph, self.config)
        tally = _Tally()
        cache: dict[str, IntBlocks | Bnb4Blocks] = {}
        pending = Counter(_cache_key(layer) for layer in layers)
        for layer in layers:
            self._lower(layer, lowering, cache, tally)
            pending[_cache_key(layer)] -= 1
            if not pending[_cache_key(layer)]:
                cache.pop(_cache_key(layer), None)  # codes of a weight no other layer reads: free them now
        if any(n.domain == MS_DOMAIN for n in model.graph):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        if lowering.needs_ir10 or opset_from is not None:
            model.ir_version = max(model.ir_version or 0, 10)  # INT4/UINT4 tensors and opset 21 need IR 10
        self.details = self._summary(model, lowering, tally, skipped, opset_from)
        return ir.passes.PassResult(model, modified=True)

    def _lower(self, layer: Layer, lowering: Lowering, cache: dict[str, IntBlocks | Bnb4Blocks], tally: _Tally) -> None:
        # Layers sharing a weight share its quantization (same orientation) and its initializers (same form).
        key = _cache_key(layer)
        emit = layer.weight.name + ("_gather" if layer.kind == "gather" else "_T" if layer.transposed else "")
        group = "embedding" if layer.kind == "gather" else "matmul"
        if key not in cache:
            cache[key] = self._quantize(layer, tally)
            tally.params[group] += layer.k * layer.n
            tally.bytes_before[group] += layer.weight.const_value.nbytes  # type: ignore[union-attr]
        tally.layers[group] += 1
        blocks = cache[key]
        written = lowering.bytes_after
        if layer.kind == "gather":
            lowering.gather(layer, blocks, emit)  # type: ignore[arg-type]
        else:
            lowering.matmul(layer, blocks, emit)
        tally.bytes_after[group] += lowering.bytes_after - written
        edit.drop_if_unused(lowering.graph, layer.weight)

    def _quantize(self, layer: Layer, tally: _Tally) -> IntBlocks | Bnb4Blocks:
        tensor = layer.weight.const_value
        w = _oriented(layer)
        hessian = self.hessians.get(layer.activation.name) if layer.activation is not None else None
        importance = np.diag(hessian).astype(np.float32) if hessian is not None else None
        blocks = self._round(layer, w, importance)
        record: dict[str, object] = {"name": layer.node.name, "weight": layer.weight.name, "shape": [layer.k, layer.n]}
        if hessian is not None and self.config.method == "gptq":
            name = layer.activation.name  # type: ignore[union-attr]
            if name not in self._inverses:  # Q, K and V read one input: one inverse for all three
                self._inverses[name] = gptq_module.inverse_cholesky(hessian, self.config.gptq_damp)
            blocks, errors = gptq_module.refine(w, hessian, self._inverses[name], blocks)  # type: ignore[assignment]
            record.update({key: round(value, 8) for key, value in errors.items()})
        record["relative_error"] = _relative_error(w, blocks)
        tally.errors.append(record)
        del w
        if isinstance(tensor, ir.ExternalTensor):
            _release(tensor)
        return blocks

    def _round(self, layer: Layer, w: np.ndarray, importance: np.ndarray | None) -> IntBlocks | Bnb4Blocks:
        config, block = self.config, self.config.block_for(layer.k)
        if config.format in _FLOAT_FORMATS and layer.kind != "gather":
            return quantize_bnb4(
                w,
                config.format,  # type: ignore[arg-type]
                block,
                double_quant=config.double_quant,
                clip_ratios=config.clip_ratios(),
                importance=importance,
            )
        return quantize_int_blocks(
            w,
            config.bits,
            block,
            symmetric=config.symmetric,
            clip_ratios=config.clip_ratios(),
            importance=importance,
            scale_type=config.scale_type,
        )

    def _summary(
        self, model: ir.Model, lowering: Lowering, tally: _Tally, skipped: dict[str, int], opset_from: int | None
    ) -> dict[str, object]:
        params = sum(tally.params.values())
        bytes_before = sum(tally.bytes_before.values())
        errors = [float(e["relative_error"]) for e in tally.errors]  # type: ignore[arg-type]
        kernels = predict_kernels(model.graph)
        return {
            "format": self.config.format,
            "bits": self.config.bits,
            "block_size": self.config.default_block,
            "method": self.config.method if self.hessians else "rtn",
            "layers": tally.layers["matmul"],
            "embeddings": tally.layers["embedding"],
            "matmul_params": tally.params["matmul"],
            "embedding_params": tally.params["embedding"],
            "bytes_before": bytes_before,
            "bytes_after": lowering.bytes_after,
            "bits_per_param": round(8 * lowering.bytes_after / params, 4) if params else None,
            "bits_per_param_by_kind": {
                kind: round(8 * tally.bytes_after[kind] / count, 4) for kind, count in tally.params.items() if count
            },
            "mean_relative_error": round(float(np.mean(errors)), 6) if errors else None,
            "max_relative_error": round(float(np.max(errors)), 6) if errors else None,
            "opset_raised_from": opset_from,
            "ort_cpu_kernels": kernels,
            "ort_notes": ort_notes(kernels, self.config.format),
            "skipped": skipped,
            "per_layer": tally.errors,
        }


def _cache_key(layer: Layer) -> str:
    return f"{layer.weight.name}|{'T' if layer.transposed else 'N'}"


def _oriented(layer: Layer) -> np.ndarray:
    """The weight as ``[K, N]`` (a view when possible; memory-mapped weights stay mapped)."""
    array = layer.weight.const_value.numpy()  # type: ignore[union-attr]
    w = array.T if layer.transposed else array
    if layer.kind == "gemm":
        alpha = layer.node.attributes.get_float("alpha", 1.0)
        if alpha != 1.0:
            w = w * np.float32(alpha)
    return w


def _columns(blocks: IntBlocks | Bnb4Blocks, cols: slice) -> IntBlocks | Bnb4Blocks:
    if isinstance(blocks, Bnb4Blocks):
        return replace(blocks, codes=blocks.codes[:, cols], absmax=blocks.absmax[:, cols])
    zero = None if blocks.zero_points is None else blocks.zero_points[:, cols]
    return replace(blocks, codes=blocks.codes[:, cols], scales=blocks.scales[:, cols], zero_points=zero)


def _relative_error(w: np.ndarray, blocks: IntBlocks | Bnb4Blocks) -> float:
    """``||w - w'|| / ||w||`` computed a column chunk at a time."""
    step = max(1, (1 << 22) // max(w.shape[0], 1))
    num = den = 0.0
    for start in range(0, w.shape[1], step):
        cols = slice(start, start + step)
        ref = np.asarray(w[:, cols], dtype=np.float32)
        diff = _columns(blocks, cols).dequantize() - ref
        num += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
        den += float(np.einsum("ij,ij->", ref, ref, dtype=np.float64))
    return round((num / den) ** 0.5, 6) if den > 0 else 0.0


def _release(tensor: ir.ExternalTensor) -> None:
    """Unmap an external weight once read, so its pages stop counting towards resident memory."""
    try:
        tensor.release()
    except BufferError:  # an array view still refers to the mapping: it is unmapped when that goes
        logger.debug("weight_only: %s is still referenced; left mapped", tensor.name)
