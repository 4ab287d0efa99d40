"""Torch -> ONNX conversion shared by every zoo model.

Uses the dynamo exporter with its built-in optimizer disabled and runs an
equivalent onnxscript pipeline ourselves, because the stock pipeline fuses
BatchNormalization into Conv and the graphopt ``fold`` pass needs BN nodes
left in the graph to have something to test.
"""

from __future__ import annotations

import collections
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import torch

from models.fileio import atomic_write_bytes

logger = logging.getLogger(__name__)

OPSET = 18
SHAPE_CONST_LIMIT = 16
# ONNX Runtime 1.31 loads IR <= 13 while onnx 1.23 writes 14; 10 is what opset 18 needs.
IR_VERSION = 10


@dataclass
class TorchModelSpec:
    """A ready-to-export torch module plus what the exporter needs to know.

    ``example_inputs`` and ``check_inputs`` are ordered like ``forward``'s
    positional parameters and keyed by the ONNX input names. ``dynamic_axes``
    maps an input name to {axis: symbolic dim name}; equal names share a Dim.
    """

    module: torch.nn.Module
    example_inputs: dict[str, np.ndarray]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    check_inputs: dict[str, np.ndarray]
    keep_batchnorm: bool = False
    atol: float = 1e-4
    dim_max: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExportResult:
    model: onnx.ModelProto
    export_seconds: float
    max_abs_err: dict[str, float]


def _dynamic_shapes(spec: TorchModelSpec) -> tuple[dict[int, Any] | None, ...]:
    dims: dict[str, Any] = {}
    shapes: list[dict[int, Any] | None] = []
    for name in spec.example_inputs:
        axes = spec.dynamic_axes.get(name)
        if not axes:
            shapes.append(None)
            continue
        entry = {}
        for axis, dim_name in axes.items():
            if dim_name not in dims:
                dims[dim_name] = torch.export.Dim(dim_name, max=spec.dim_max.get(dim_name))
            entry[axis] = dims[dim_name]
        shapes.append(entry)
    return tuple(shapes)


def _rewrite_rules(keep_batchnorm: bool) -> list[Any]:
    from onnxscript import rewriter
    from onnxscript.rewriter.rules import common as rules

    # Private, but it is exactly the rule list the exporter would use.
    default = list(getattr(rewriter, "_DEFAULT_REWRITE_RULES", ()))
    if not default:
        logger.warning("onnxscript default rewrite rules not found; constant folding only")
    if not keep_batchnorm:
        return default
    bn_rules = {
        id(rules.fuse_batchnorm_into_conv_rule),
        id(rules.fuse_batchnorm_into_conv_transpose_rule),
        id(rules.fuse_batchnorm_into_gemm_rule),
    }
    return [r for r in default if id(r) not in bn_rules]


def _name_transposed_weights(model: ir.Model) -> None:
    """Name ``Transpose(W)`` outputs ``<W>.T`` before they are constant-folded.

    Otherwise the folded [in, out] copies of Linear weights end up as anonymous
    ``val_N`` initializers and the parameter names are lost.
    """
    for node in model.graph:
        source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if source is None or not source.is_initializer():
            continue
        perm = node.attributes.get("perm")
        if perm is not None and list(perm.as_ints()) == [1, 0]:
            node.outputs[0].name = f"{source.name}.T"


def optimize_ir(model: ir.Model, *, keep_batchnorm: bool) -> None:
    """Mirror of ``onnxscript.optimizer.optimize_ir`` with optional BN fusion.

    Initializer dedup is limited to tiny tensors: in the CNN two BN biases
    train to identical values (both branches are summed, so their gradients
    are equal) and the stock pass would make them one shared tensor, which
    pre-empts graphopt's own passes and complicates folding tests.
    """
    from onnx_ir.passes import common
    from onnxscript import rewriter
    from onnxscript.optimizer import fold_constants_ir

    rules = _rewrite_rules(keep_batchnorm)
    common.InlinePass()(model)
    _name_transposed_weights(model)
    for _ in range(2):
        fold_constants_ir(model)
        if rules:
            rewriter.RewritePass(rules)(model)
        common.RemoveUnusedNodesPass()(model)
    for ir_pass in (
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        # Shape/axes constants only, so CSE can merge the per-head shape arithmetic.
        common.DeduplicateInitializersPass(size_limit=SHAPE_CONST_LIMIT),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.NameFixPass(),
    ):
        ir_pass(model)


def _to_torch(inputs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    # Copy: inputs may be read-only views of cached arrays.
    return tuple(torch.tensor(v) for v in inputs.values())


def torch_to_onnx(spec: TorchModelSpec) -> onnx.ModelProto:
    """Export ``spec.module`` (eval mode) to an optimized opset-18, IR-10 ModelProto."""
    spec.module.eval()
    with warnings.catch_warnings():
        # Benign: emitted when several inputs share one Dim (the names still apply)
        # and by torch's own pytree internals.
        warnings.filterwarnings("ignore", message=r".*The axis name: .* will not be used")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
        program = torch.onnx.export(
            spec.module,
            _to_torch(spec.example_inputs),
            dynamo=True,
            opset_version=OPSET,
            input_names=list(spec.example_inputs),
            output_names=list(spec.output_names),
            dynamic_shapes=_dynamic_shapes(spec),
            optimize=False,
            verbose=False,
        )
    optimize_ir(program.model, keep_batchnorm=spec.keep_batchnorm)
    proto = program.model_proto
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    return proto


def run_torch(module: torch.nn.Module, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.inference_mode():
        out = module.eval()(*_to_torch(inputs))
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [o.detach().cpu().numpy() for o in outs]


def run_ort(model: onnx.ModelProto | Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def compare(spec: TorchModelSpec, proto: onnx.ModelProto) -> dict[str, float]:
    """Max abs error per output between torch and ONNX Runtime on check_inputs."""
    expected = run_torch(spec.module, spec.check_inputs)
    actual = run_ort(proto, spec.check_inputs)
    errors = {
        name: float(np.max(np.abs(e.astype(np.float64) - a)))
        for name, e, a in zip(spec.output_names, expected, actual, strict=True)
    }
    worst = max(errors.values())
    if not worst <= spec.atol:
        raise RuntimeError(f"ORT output differs from torch: {errors} > atol {spec.atol}")
    return errors


def export_spec(spec: TorchModelSpec) -> ExportResult:
    start = time.perf_counter()
    proto = torch_to_onnx(spec)
    seconds = time.perf_counter() - start
    return ExportResult(proto, seconds, compare(spec, proto))


def op_histogram(model: onnx.ModelProto) -> dict[str, int]:
    counts = collections.Counter(node.op_type for node in model.graph.node)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in dims]


def io_signature(model: onnx.ModelProto) -> tuple[dict[str, Any], dict[str, Any]]:
    """({input: {dtype, shape}}, {output: {dtype, shape}}) with symbolic dims as str."""

    def describe(values: Any) -> dict[str, Any]:
        return {
            v.name: {
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": _dims(v),
            }
            for v in values
        }

    return describe(model.graph.input), describe(model.graph.output)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Single-file save; zoo models are far below protobuf's 2 GB limit."""
    atomic_write_bytes(path, model.SerializeToString())
