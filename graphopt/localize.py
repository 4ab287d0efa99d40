"""Layer-wise error localisation: which tensors of the candidate drift from the reference.

Tensors are matched by name; a tensor that the candidate quantizes is compared at its
DequantizeLinear output (what its readers actually see). Both models run on the same
batches with the matched tensors as extra outputs, and per tensor only running sums are
kept, so memory is one batch of activations whatever the sample count. The ranking is
by SQNR (signal-to-quantization-noise ratio, dB): the lowest is the worst.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from graphopt import runtime
from graphopt.calibration.collect import with_outputs
from graphopt.calibration.sources import DataSpec, input_specs, iter_batches
from graphopt.passes import edit


@dataclass
class LayerError:
    """How far one intermediate tensor of the candidate is from the reference."""

    tensor: str
    node: str
    op_type: str
    sqnr_db: float
    rel_l2: float
    max_abs: float
    sqnr_drop_db: float = 0.0  # SQNR lost at this node: worst input SQNR minus this output's

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _typed(model: ir.Model) -> ir.Model:
    """``model``, or a copy with the missing types of its main-graph tensors inferred."""
    if all(out.dtype is not None for node in model.graph for out in node.outputs if out.name):
        return model
    typed = model.clone()
    edit.infer_types(typed)
    return typed


def _producers(graph: ir.Graph) -> dict[str, ir.Node]:
    return {out.name: node for node in graph for out in node.outputs if out.name}


def match_tensors(reference: ir.Model, candidate: ir.Model) -> dict[str, str]:
    """Reference float tensor name -> candidate tensor name that carries the same value."""
    ref_producers = _producers(reference.graph)
    cand_producers = _producers(candidate.graph)
    matched: dict[str, str] = {}
    for name, node in ref_producers.items():
        value = next(v for v in node.outputs if v.name == name)
        if value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            continue
        seen = _seen_by_readers(name, cand_producers)
        if seen is not None:
            matched[name] = seen
    return matched


def _seen_by_readers(name: str, producers: dict[str, ir.Node]) -> str | None:
    """The DQ output that stands in for ``name`` when the candidate quantized it, else ``name``.

    Quantizers (graphopt's and ONNX Runtime's) name that output ``<name>_DequantizeLinear``;
    matching by name rather than by wiring keeps a Q that absorbed a ReLU (it reads the
    pre-ReLU tensor) from being compared with the pre-ReLU reference.
    """
    stand_in = producers.get(f"{name}_DequantizeLinear")
    if stand_in is not None and stand_in.op_type == "DequantizeLinear":
        return f"{name}_DequantizeLinear"
    return name if name in producers else None


@dataclass
class _Sums:
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    max_abs: float = 0.0

    def add(self, ref: np.ndarray, cand: np.ndarray) -> None:
        r, c = ref.astype(np.float64), cand.astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            # Equal values (a mask's -inf in both models included) differ by nothing; a value non-finite in one
            # model only (an overflow, a NaN) differs without bound.
            same = (r == c) | (np.isnan(r) & np.isnan(c))
            diff = np.where(same, 0.0, r - c)
            diff[np.isnan(diff)] = np.inf
            self.diff_sq += float(np.sum(diff * diff))
            self.ref_sq += float(np.sum(np.where(np.isfinite(r), r * r, 0.0)))
        self.max_abs = max(self.max_abs, float(np.max(np.abs(diff), initial=0.0)))


def layer_errors(
    reference: ir.Model,
    candidate: ir.Model,
    data: DataSpec,
    *,
    device: str = "cpu",
    threads: int | None = None,
    group_size: int | None = None,
) -> list[LayerError]:
    """Compare every matched intermediate tensor over ``data``; worst (lowest SQNR) first.

    Exporters that write no value_info (torch's TorchScript exporter) leave intermediate
    tensors untyped: types are inferred on copies first, so those tensors are compared too.
    """
    reference, candidate = _typed(reference), _typed(candidate)
    matched = match_tensors(reference, candidate)
    names = list(matched)
    size = group_size or max(len(names), 1)
    sums = {name: _Sums() for name in names}
    specs = input_specs(reference)
    for start in range(0, len(names), size):
        group = names[start : start + size]
        ref_session = runtime.create_session(with_outputs(reference, group), device, threads=threads)
        cand_session = runtime.create_session(
            with_outputs(candidate, [matched[n] for n in group]), device, threads=threads
        )
        for batch in iter_batches(data, specs):
            ref_out = runtime.run(ref_session, batch, group)
            cand_out = runtime.run(cand_session, batch, [matched[n] for n in group])
            for name in group:
                if ref_out[name].shape == cand_out[matched[name]].shape:
                    sums[name].add(ref_out[name], cand_out[matched[name]])
    producers = _producers(reference.graph)
    rows = {name: _row(name, producers[name], s) for name, s in sums.items() if s.ref_sq > 0 or s.diff_sq > 0}
    for row in rows.values():
        inputs = [rows[v.name].sqnr_db for v in producers[row.tensor].inputs if v is not None and v.name in rows]
        source = min(inputs, default=math.inf)
        row.sqnr_drop_db = source - row.sqnr_db if math.isfinite(source) or math.isfinite(row.sqnr_db) else 0.0
    return sorted(rows.values(), key=lambda r: r.sqnr_db)


def _row(name: str, node: ir.Node, sums: _Sums) -> LayerError:
    if sums.diff_sq == 0:
        sqnr = math.inf
    elif sums.ref_sq == 0 or not math.isfinite(sums.diff_sq):  # nothing to compare with, or the candidate overflowed
        sqnr = -math.inf
    else:
        sqnr = 10.0 * math.log10(sums.ref_sq / sums.diff_sq)
    rel = math.sqrt(sums.diff_sq / sums.ref_sq) if sums.ref_sq > 0 else math.sqrt(sums.diff_sq)
    return LayerError(name, node.name or name, node.op_type, sqnr, rel, sums.max_abs)


def blame(reference: ir.Model, candidate: ir.Model, errors: Sequence[LayerError]) -> list[str]:
    """Quantized tensors to suspect, in order of where SQNR drops most.

    A drop at a quantized tensor blames it; a drop at a float op (a Softmax reading a
    quantized score tensor, say) blames that op's quantized inputs. SQNR alone can miss a
    tensor whose huge range (a -3.4e38 mask) hides the rounding of its ordinary values.
    """
    matched = match_tensors(reference, candidate)
    quantized = {name for name, seen in matched.items() if seen != name}
    producers = _producers(reference.graph)
    order: dict[str, None] = {}
    for row in sorted(errors, key=lambda r: -r.sqnr_drop_db):
        if row.tensor in quantized:
            order[row.tensor] = None
            continue
        node = producers.get(row.tensor)
        for value in node.inputs if node is not None else ():
            if value is not None and value.name in quantized:
                order[value.name] = None
    return list(order)
