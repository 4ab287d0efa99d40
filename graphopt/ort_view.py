"""What ONNX Runtime really runs: the graph after its own fusions, on the target device.

Q/DQ in a file is only a request. This opens a session with the deployment's default
options, saves the graph ORT optimized it into, and reads it back: which compute ops
became integer kernels, which Q/DQ nodes stayed unfused, and what a user should know
before deploying (no INT8 kernels on the CUDA EP, sparse initializers densified, fp16
computed in fp32 on the CPU).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx_ir as ir

from graphopt import runtime
from graphopt.passes.weight_only import kernels

INTEGER_KERNELS = frozenset(
    {
        "QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat", "MatMulNBits", "MatMulBnb4", "QAttention", "DynamicQuantizeLSTM",
    }
)  # fmt: skip
FLOAT_COMPUTE = frozenset({"Conv", "FusedConv", "NhwcFusedConv", "MatMul", "FusedMatMul", "Gemm", "FusedGemm"})
# Input index of the weight in each kernel (for weighting by parameter count).
_WEIGHT_INPUT = {"QLinearConv": 3, "QLinearMatMul": 3, "QGemm": 3, "MatMulInteger": 1, "ConvInteger": 1}


@dataclass
class RuntimeView:
    """A summary of ONNX Runtime's optimized graph for one model on one device."""

    device: str
    providers: list[str]
    ops: dict[str, int] = field(default_factory=dict)
    integer_kernels: int = 0
    float_compute: int = 0
    integer_weight_share: float = 0.0
    unfused_quantize: int = 0
    unfused_dequantize: int = 0
    sparse_initializers: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _weight_elements(graph: ir.Graph, node: ir.Node) -> int:
    if node.op_type in ("MatMulNBits", "MatMulBnb4"):
        return node.attributes.get_int("K", 0) * node.attributes.get_int("N", 0)
    index = _WEIGHT_INPUT.get(node.op_type, 1)
    value = node.inputs[index] if len(node.inputs) > index else None
    producer = value.producer() if value is not None else None
    if producer is not None and producer.op_type == "DequantizeLinear" and producer.inputs:
        value = producer.inputs[0]  # a float layer behind a DequantizeLinear ORT did not fuse: its weights count too
    if value is not None and value.const_value is not None:
        return int(value.const_value.size)
    if value is not None and value.name in graph.initializers:
        return int(graph.initializers[value.name].const_value.size)
    return 0


def inspect_runtime(model: ir.Model, device: str = "cpu", *, threads: int | None = None) -> RuntimeView:
    """Let ONNX Runtime optimize ``model`` for ``device`` and summarise what it will run."""
    optimized, session = runtime.optimized_graph(model, device, threads=threads)
    view = RuntimeView(device=device, providers=list(session.get_providers()))
    nodes = list(optimized.graph)
    view.ops = dict(Counter(n.op_type for n in nodes).most_common())
    integer = [n for n in nodes if n.op_type in INTEGER_KERNELS]
    floating = [n for n in nodes if n.op_type in FLOAT_COMPUTE]
    view.integer_kernels, view.float_compute = len(integer), len(floating)
    int_weights = sum(_weight_elements(optimized.graph, n) for n in integer)
    float_weights = sum(_weight_elements(optimized.graph, n) for n in floating)
    view.integer_weight_share = int_weights / (int_weights + float_weights) if int_weights + float_weights else 0.0
    view.unfused_quantize = view.ops.get("QuantizeLinear", 0)
    view.unfused_dequantize = view.ops.get("DequantizeLinear", 0)
    view.warnings = _warnings(model, view)
    return view


def note_sparse_initializers(view: dict[str, object], count: int) -> None:
    """Add what saving with ``count`` sparse initializers means at run time to a view's dict (sizes are known
    only once the model is written)."""
    view["sparse_initializers"] = count
    if count:
        warnings = view.setdefault("warnings", [])
        assert isinstance(warnings, list)
        warnings.append(
            f"{count} sparse initializer(s): ONNX Runtime densifies them at load, so they save disk, not memory or "
            "time."
        )


def _warnings(model: ir.Model, view: RuntimeView) -> list[str]:
    found = []
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph)
    if view.device == "cuda" and has_qdq:
        found.append(
            "the CUDA EP has no INT8 QLinear kernels: Q/DQ pairs run as float ops, so this model is not faster on "
            "CUDA; quantize for TensorRT, or use weight_only/fp16 for CUDA."
        )
    if view.device == "cpu" and has_qdq and view.integer_kernels == 0:
        found.append("the model holds Q/DQ but ORT fused no integer kernel: expect it to be slower than float.")
    # float16 compute, not float16 scales of int4 weights (MatMulNBits reads those as they are).
    fp16 = any(
        v.dtype == ir.DataType.FLOAT16 and any(u.node.op_type in FLOAT_COMPUTE for u in v.uses())
        for v in model.graph.initializers.values()
    )
    if view.device == "cpu" and fp16:
        found.append("float16 weights on the CPU EP: ORT computes most ops in float32, so fp16 brings no speed here.")
    return found


def observed_kernels(model: runtime.ModelSource, *, optimization: str = "all") -> dict[str, int]:
    """Open ``model`` in ONNX Runtime (CPU), save its optimized graph and count the same kernels.

    Only for models ONNX Runtime can save inline (under 2 GB).
    """
    optimized, _ = runtime.optimized_graph(model, "cpu", threads=1, optimization=optimization)
    counted: Counter[str] = Counter()
    for node in optimized.graph:
        kernel = kernels.contrib_kernel(node)
        weight = node.inputs[0] if node.op_type == "DequantizeLinear" and node.inputs else None
        if kernel is None and weight is not None and weight.const_value is not None and weight.dtype in kernels.BITS:
            readers = [use.node.op_type for use in node.outputs[0].uses()]
            kernel = f"DequantizeLinear+{readers[0]}" if readers else None
        if kernel is not None:
            counted[kernel] += 1
    return dict(sorted(counted.items()))


def float_layers(model: ir.Model, device: str = "cpu", *, threads: int | None = None) -> tuple[set[str], set[str]]:
    """Compute layers ONNX Runtime left in float behind a DequantizeLinear (Q/DQ it did not fuse).

    Returns the names of those nodes in ORT's optimized graph (ORT keeps the names of nodes it
    does not fuse) and the names of the integer weights their DequantizeLinear reads.
    """
    optimized, _ = runtime.optimized_graph(model, device, threads=threads)
    names: set[str] = set()
    weights: set[str] = set()
    for node in optimized.graph:
        if node.op_type not in FLOAT_COMPUTE:
            continue
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is None or producer.op_type != "DequantizeLinear":
                continue
            names.add(node.name)
            source = producer.inputs[0]
            if source is not None and (source.const_value is not None or source.is_initializer()):
                weights.add(source.name)
    return names, weights
