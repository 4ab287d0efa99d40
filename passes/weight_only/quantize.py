"""Weight-only quantization: MatMul/Gemm/Gather weights in 4 or 8 bits, activations left in float."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from graphopt.numerics import gptq as numerics_gptq
from graphopt.numerics.blocks import IntBlocks, quantize_int_blocks
from graphopt.numerics.nf4 import Bnb4Blocks, quantize_bnb4
from graphopt.passes import edit
from graphopt.passes.weight_only import awq
from graphopt.passes.weight_only import gptq as gptq_module
from graphopt.passes.weight_only.config import FLOAT_FORMATS, WeightOnlyConfig
from graphopt.passes.weight_only.kernels import ort_notes, predict_kernels
from graphopt.passes.weight_only.layers import Layer, plan_layers
from graphopt.passes.weight_only.lower import MS_DOMAIN, Lowering, raise_opset

logger = logging.getLogger(__name__)


@dataclass
class _Tally:
    """Running totals for the pass's details."""

    layers: Counter[str] = field(default_factory=Counter)
    params: Counter[str] = field(default_factory=Counter)
    bytes_after: Counter[str] = field(default_factory=Counter)
    bytes_before: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, object]] = field(default_factory=list)


class WeightOnlyQuantizePass(ir.passes.InPlacePass):
    """Store MatMul/Gemm weights and embedding tables in 4 or 8 bits while activations stay in float.

    Weights are quantized in blocks along the reduction axis (INT4/INT8, symmetric or with
    zero points, or QLoRA's NF4/FP4 with double-quantized scales), by round-to-nearest with
    a per-block clip search or by GPTQ from calibration Hessians, and written as
    com.microsoft.MatMulNBits, a standard blocked DequantizeLinear (opset raised to 21 after
    checking every op) or com.microsoft.MatMulBnb4; embedding tables become
    com.microsoft.GatherBlockQuantized. Gemm becomes the MatMul form plus an Add of its
    bias. Graph inputs/outputs keep their names, shapes and types; weights that are not
    constant float32/float16 matrices (already quantized ones included) are left alone; float16
    weights keep float16 scales and outputs. Layers in
    If/Loop/Scan bodies are rewritten too (their quantized weights are main-graph
    initializers the body reads from the outer scope; GPTQ has no Hessian there and rounds
    to nearest); functions are left alone. Weights held in external data are read and
    released one at a time.

    Attributes:
        config: The pass options.
        hessians: ``X^T X / n`` per layer input name (from :func:`collect_hessians`), for GPTQ.
    """

    def __init__(self, config: WeightOnlyConfig, hessians: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self.config = config
        self._given = dict(hessians or {})
        self.hessians = dict(self._given)
        self.details: dict[str, object] = {}
        self._inverses: dict[str, tuple[np.ndarray | None, np.ndarray | None]] = {}
        self._tied: set[str] = set()
        self._wide: set[str] = set()  # weights stored at 8 bits in a 4-bit model (mixed_share)
        self._scalings: list[awq.Scaling] = []

    def _why_no_work(self, model: ir.Model) -> str:
        """Why no layer was a candidate at all (a conv net, a tree model), and which pass would compress it."""
        convs = sum(
            1
            for n in ir.traversal.RecursiveGraphIterator(model.graph)
            if n.op_type == "Conv" and n.domain in ("", "ai.onnx")
        )
        reason = f"nothing to quantize: no {'/'.join(self.config.op_types)} with a constant float weight"
        return reason + (f"; its {convs} Conv weights are quantize's to compress (static int8)" if convs else "")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self._inverses = {}
        if self.config.method == "gptq" and not self.hessians:
            logger.info("weight_only: method gptq without Hessians; falling back to round-to-nearest")
        layers, skipped = plan_layers(model.graph, self.config)
        if not layers:
            self.details = {"layers": 0, "skipped": skipped or self._why_no_work(model)}
            return ir.passes.PassResult(model, modified=False)
        opset_from = raise_opset(model) if self.config.format == "qdq" else None
        lowering = Lowering(model.graph, self.config)
        tally = _Tally()
        cache: dict[str, IntBlocks | Bnb4Blocks] = {}
        self._tied = {layer.weight.name for layer in layers if layer.via is not None}
        self._scalings = []
        self.hessians = dict(self._given)  # AWQ renames and rescales entries: the caller's statistics stay as given
        if self.config.awq and self.hessians:
            self._scalings = awq.apply(
                model.graph, [x for x in layers if x.weight.name not in self._tied], self.hessians, self.config
            )
        self._wide = set()  # empty while _mixed rounds every weight at 4 bits to rank them
        self._wide = self._mixed(layers) if self.config.mixed_share else set()
        pending = Counter(self._cache_key(layer) for layer in layers)
        # Readers that share one quantization (a tied table and LM head) take it from the one with calibration
        # statistics: layers with a Hessian go first, so GPTQ rounds the shared weight for the MatMul's output.
        layers = sorted(layers, key=lambda layer: self._hessian(layer) is None)
        readers = Counter(layer.activation.name for layer in layers if layer.activation is not None)
        for layer in layers:
            self._lower(layer, lowering, cache, tally)
            if layer.activation is not None:
                readers[layer.activation.name] -= 1
                if not readers[layer.activation.name]:  # Q, K and V done: their inverse is not needed again
                    self._inverses.pop(layer.activation.name, None)
            pending[self._cache_key(layer)] -= 1
            if not pending[self._cache_key(layer)]:
                cache.pop(self._cache_key(layer), None)  # codes of a weight no other layer reads: free them now
        if any(n.domain == MS_DOMAIN for n in ir.traversal.RecursiveGraphIterator(model.graph)):
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        if lowering.needs_ir10 or opset_from is not None:
            model.ir_version = max(model.ir_version or 0, 10)  # INT4/UINT4 tensors and opset 21 need IR 10
        self.details = self._summary(model, lowering, tally, skipped, opset_from)
        return ir.passes.PassResult(model, modified=True)

    def _cache_key(self, layer: Layer) -> str:
        return _cache_key(layer, self.config, layer.weight.name in self._tied)

    def _hessian(self, layer: Layer) -> np.ndarray | None:
        return self.hessians.get(layer.activation.name) if layer.activation is not None else None

    def _lower(self, layer: Layer, lowering: Lowering, cache: dict[str, IntBlocks | Bnb4Blocks], tally: _Tally) -> None:
        # Layers sharing a weight share its quantization (same orientation) and its initializers (same form).
        key = self._cache_key(layer)
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
        if layer.via is not None and not layer.via.outputs[0].uses():  # the tied table's Transpose now reads for no one
            layer.via.graph.remove(layer.via, safe=True)  # type: ignore[union-attr]
        owner = layer.weight.graph
        edit.drop_if_unused(owner if isinstance(owner, ir.Graph) else lowering.graph, layer.weight)

    def _quantize(self, layer: Layer, tally: _Tally) -> IntBlocks | Bnb4Blocks:
        tensor = layer.weight.const_value
        w = _oriented(layer)
        hessian = self._hessian(layer)
        importance = np.diag(hessian).astype(np.float32) if hessian is not None else None
        blocks = self._round(layer, w, importance)
        record: dict[str, object] = {"name": layer.node.name, "weight": layer.weight.name, "shape": [layer.k, layer.n]}
        record["bits"] = getattr(blocks, "bits", 4)
        if hessian is not None and self.config.runs_gptq:
            name = layer.activation.name  # type: ignore[union-attr]
            if name not in self._inverses:  # Q, K and V read one input: one inverse for all three
                self._inverses[name] = numerics_gptq.prepare(hessian, self.config.gptq_damp, self.config.act_order)
            order, u = self._inverses[name]
            blocks, errors = gptq_module.refine(w, hessian, u, blocks, order)  # type: ignore[assignment]
            record.update({key: round(value, 8) for key, value in errors.items()})
        record["relative_error"] = _relative_error(w, blocks)
        tally.errors.append(record)
        del w
        if isinstance(tensor, ir.ExternalTensor):
            _release(tensor)
        return blocks

    def _round(self, layer: Layer, w: np.ndarray, importance: np.ndarray | None) -> IntBlocks | Bnb4Blocks:
        config, block = self.config, self.config.block_for(layer.k)
        if config.format in FLOAT_FORMATS and layer.kind != "gather":
            return quantize_bnb4(
                w,
                config.format,  # type: ignore[arg-type]
                block,
                double_quant=config.double_quant,
                clip_ratios=config.clip_ratios(),
                importance=importance,
            )
        table = layer.kind == "gather" or layer.weight.name in self._tied  # a tied LM head is the table too
        bits = config.embedding_bits if table and config.embedding_bits else config.bits
        if layer.weight.name in self._wide:
            bits = 8
        return quantize_int_blocks(
            w,
            bits,
            block,
            symmetric=config.symmetric,
            clip_ratios=config.clip_ratios(),
            importance=importance,
            # a float16 layer's kernels read float16 scales (MatMulNBits' T1 is A's type)
            scale_type="float16" if layer.dtype == ir.DataType.FLOAT16 else config.scale_type,
        )

    def _mixed(self, layers: list[Layer]) -> set[str]:
        """The MatMul/Gemm weights to store at 8 bits: ``mixed_share`` of their parameters, chosen by how much of
        its output each layer's 4-bit rounding loses per parameter promoted.

        A layer's loss is ``tr(D^T H D) / tr(W^T H W)`` for the round-to-nearest error ``D`` (the share of its
        output's energy that 4 bits turn into noise, on the calibration inputs), or ``||D||^2 / ||W||^2`` without
        a Hessian. 8 bits take that loss to ~1/256 of it, so the weights go by loss over size, largest first, while
        they fit in the share (a greedy knapsack: small projections with large losses are promoted first). A tied
        LM head competes like any MatMul (promoted, its table takes 8 bits too: one copy for both); embedding tables
        otherwise keep their own bits (``embedding_bits``).
        """
        losses: dict[str, tuple[float, int]] = {}
        tied_bits = self.config.embedding_bits or self.config.bits
        for layer in layers:
            name = layer.weight.name
            if layer.kind == "gather" or name in losses or (name in self._tied and tied_bits == 8):
                continue
            w = _oriented(layer)
            hessian = self._hessian(layer)
            importance = np.diag(hessian).astype(np.float32) if hessian is not None else None
            blocks = self._round(layer, w, importance)
            losses[name] = (_output_loss(w, blocks, hessian), layer.k * layer.n)
            del w, blocks
            tensor = layer.weight.const_value
            if isinstance(tensor, ir.ExternalTensor):
                _release(tensor)
        total = sum(size for _, size in losses.values())
        room = self.config.mixed_share * total
        wide: set[str] = set()
        for name, (_, size) in sorted(losses.items(), key=lambda kv: -kv[1][0] / kv[1][1]):
            if size <= room:
                wide.add(name)
                room -= size
        logger.info(
            "weight_only: %d of %d weights (%.1f%% of the MatMul parameters) at 8 bits",
            len(wide),
            len(losses),
            100.0 * sum(losses[n][1] for n in wide) / max(total, 1),
        )
        return wide

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
            "method": "gptq" if self.hessians and self.config.runs_gptq else "rtn",
            "awq": [scaling.to_dict() for scaling in self._scalings] if self.config.awq else None,
            "layers": tally.layers["matmul"],
            "embeddings": tally.layers["embedding"],
            "matmul_params": tally.params["matmul"],
            "embedding_params": tally.params["embedding"],
            "bytes_before": bytes_before,
            "bytes_after": lowering.bytes_after,
            "bits_per_param": round(8 * lowering.bytes_after / params, 4) if params else None,
            "layers_at_8_bits": len(self._wide) if self.config.mixed_share else None,
            "bits_per_param_by_kind": {
                kind: round(8 * tally.bytes_after[kind] / count, 4) for kind, count in tally.params.items() if count
            },
            "mean_relative_error": round(float(np.mean(errors)), 6) if errors else None,
            "max_relative_error": round(float(np.max(errors)), 6) if errors else None,
            "opset_raised_from": opset_from,
            "ort_cpu_kernels": kernels,
            "ort_notes": ort_notes(kernels, self.config.format, lowering.cast_scales),
            "skipped": skipped,
            "per_layer": tally.errors,
        }


def _cache_key(layer: Layer, config: WeightOnlyConfig, tied: bool = False) -> str:
    """Layers with the same key share one quantization: same weight, orientation and number format
    (an embedding stays integer where MatMuls take NF4/FP4, and takes ``embedding_bits`` when set; a tied
    weight takes ``embedding_bits`` for both readers, one copy)."""
    own_bits = config.embedding_bits not in (None, config.bits) and not tied
    separate = layer.kind == "gather" and (config.format in FLOAT_FORMATS or own_bits)
    return f"{layer.weight.name}|{'T' if layer.transposed else 'N'}{'|gather' if separate else ''}"


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


def _output_loss(w: np.ndarray, blocks: IntBlocks | Bnb4Blocks, hessian: np.ndarray | None) -> float:
    """The share of the layer output's energy its quantization error makes: ``tr(D^T H D) / tr(W^T H W)``, or
    ``||D||^2 / ||W||^2`` without a Hessian (a column chunk at a time)."""
    step = max(1, (1 << 22) // max(w.shape[0], 1))
    num = den = 0.0
    for start in range(0, w.shape[1], step):
        cols = slice(start, start + step)
        ref = np.asarray(w[:, cols], dtype=np.float32)
        diff = _columns(blocks, cols).dequantize() - ref
        if hessian is None:
            num += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
            den += float(np.einsum("ij,ij->", ref, ref, dtype=np.float64))
        else:
            num += numerics_gptq.output_error(diff, 0.0, hessian)
            den += numerics_gptq.output_error(ref, 0.0, hessian)
    return num / den if den > 0 else 0.0


def _relative_error(w: np.ndarray, blocks: IntBlocks | Bnb4Blocks) -> float:
    """``||w - w'|| / ||w||``."""
    return round(_output_loss(w, blocks, None) ** 0.5, 6)


def _release(tensor: ir.ExternalTensor) -> None:
    """Unmap an external weight once read, so its pages stop counting towards resident memory."""
    try:
        tensor.release()
    except BufferError:  # an array view still refers to the mapping: it is unmapped when that goes
        logger.debug("weight_only: %s is still referenced; left mapped", tensor.name)
