"""Which ONNX Runtime CPU kernels read the quantized weights: predicted from the graph, and observed.

:func:`predict_kernels` reads the graph the ``weight_only`` pass wrote and applies what ONNX
Runtime's CPU graph optimizations (level extended/all) do with it, so the pass can report
it without opening a session. :func:`graphopt.ort_view.observed_kernels` opens a session, saves ORT's
optimized graph and counts the same kernels: tests and benchmarks compare the two.

What ORT 1.20+ does on CPU, and the traps that decide speed:

- ``DequantizeLinear(blocked, axis 0) -> MatMul`` with constant int4/uint4/int8/uint8
  weights becomes ``MatMulNBits`` with ``accuracy_level`` taken from the session option
  ``session.qdq_matmulnbits_accuracy_level`` (default 4: activations are quantized to
  int8 per block inside the kernel, moving outputs by ~0.5% relative);
- it does not when the MatMul's only reader is a Relu/Clip that itself has one reader (ORT
  reserves that shape for a Q/DQ group), nor after MatMul + Add + Relu become a FusedGemm:
  the weight is then dequantized to float at every run;
- ``MatMulNBits`` with 8-bit weights at ``accuracy_level`` 0 runs a float kernel several
  times slower than the float32 model at batch 1; level 4 is the fast one.
"""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

QDQ_DEFAULT_ACCURACY_LEVEL = 4
BITS = {
    ir.DataType.INT4: 4,
    ir.DataType.UINT4: 4,
    ir.DataType.INT8: 8,
    ir.DataType.UINT8: 8,
}
_CLIP_LIKE = frozenset({"Relu", "Clip"})


def nbits_kernel(bits: int, accuracy_level: int) -> str:
    """The name this module gives a MatMulNBits kernel."""
    return f"MatMulNBits(bits={bits}, accuracy_level={accuracy_level})"


def _single_reader(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and not value.is_graph_output() else None


def _blocks_ort_fusion(matmul: ir.Node) -> str | None:
    """The kernel ORT runs instead of MatMulNBits for a DQ -> ``matmul``, or None if it fuses."""
    reader = _single_reader(matmul.outputs[0])
    if reader is not None and reader.op_type in _CLIP_LIKE and _single_reader(reader.outputs[0]) is not None:
        return "DequantizeLinear+MatMul"
    if reader is not None and reader.op_type == "Add" and _rank(matmul.inputs[0]) == 2:
        after = _single_reader(reader.outputs[0])
        if after is not None and after.op_type == "Relu" and _single_reader(after.outputs[0]) is not None:
            return "DequantizeLinear+FusedGemm"
    return None


def _rank(value: ir.Value | None) -> int | None:
    return len(value.shape) if value is not None and value.shape is not None else None


def _dq_kernel(node: ir.Node, accuracy_level: int) -> str | None:
    """The kernel for a blocked DequantizeLinear of a constant weight feeding a MatMul."""
    weight = node.inputs[0]
    if weight is None or weight.const_value is None or weight.dtype not in BITS:
        return None
    if "block_size" not in node.attributes or len(node.outputs[0].uses()) != 1:
        return None
    reader, index = next(iter(node.outputs[0].uses()))
    if reader.op_type != "MatMul" or index != 1:
        return None
    return _blocks_ort_fusion(reader) or nbits_kernel(BITS[weight.dtype], accuracy_level)


def contrib_kernel(node: ir.Node) -> str | None:
    """The kernel name of a com.microsoft node that reads a quantized weight, or None."""
    if node.domain != "com.microsoft":
        return None
    if node.op_type == "MatMulNBits":
        return nbits_kernel(node.attributes.get_int("bits", 4), node.attributes.get_int("accuracy_level", 0))
    if node.op_type == "MatMulBnb4":
        return f"MatMulBnb4({'nf4' if node.attributes.get_int('quant_type', 1) == 1 else 'fp4'})"
    if node.op_type == "GatherBlockQuantized":
        return f"GatherBlockQuantized(bits={node.attributes.get_int('bits', 4)})"
    return None


def predict_kernels(graph: ir.Graph, qdq_accuracy_level: int = QDQ_DEFAULT_ACCURACY_LEVEL) -> dict[str, int]:
    """Kernels that read quantized weights in ``graph`` once ORT's CPU optimizations ran, with counts."""
    kernels: Counter[str] = Counter()
    for node in graph:
        kernel = contrib_kernel(node)
        if kernel is None and node.domain in ("", "ai.onnx") and node.op_type == "DequantizeLinear":
            kernel = _dq_kernel(node, qdq_accuracy_level)
        if kernel is not None:
            kernels[kernel] += 1
    return dict(sorted(kernels.items()))


def ort_notes(kernels: dict[str, int], format_: str, cast_scales: bool = False) -> list[str]:
    """What a user should know about how ONNX Runtime will run these kernels (``cast_scales``: float16 scales
    reach MatMulNBits through a Cast)."""
    notes = []
    if cast_scales and any(k.startswith("MatMulNBits") and k.endswith("accuracy_level=4)") for k in kernels):
        notes.append(
            "MatMulNBits with accuracy_level 4 reads its float16 scales through a Cast that ONNX Runtime folds at "
            "load; with graph optimizations off (ORT_DISABLE_ALL) ORT 1.31 computes such a node wrongly. Keep "
            "optimizations on, or set scale_type: float32."
        )
    if format_ == "qdq":
        notes.append(
            "ORT's CPU EP fuses DequantizeLinear -> MatMul into MatMulNBits with accuracy_level 4 (int8 "
            "activations, outputs move ~0.5% relative); set the session option "
            "session.qdq_matmulnbits_accuracy_level=0 to compute in float."
        )
    unfused = sum(count for kernel, count in kernels.items() if kernel.startswith("DequantizeLinear"))
    if unfused:
        notes.append(
            f"{unfused} MatMul(s) stay float in ORT, which dequantizes their weights at every run (a Relu/Clip "
            "or Add+Relu follows them); format matmul_nbits avoids this."
        )
    if any(kernel == nbits_kernel(8, 0) for kernel in kernels):
        notes.append("8-bit MatMulNBits at accuracy_level 0 runs several times slower than float32 at batch 1.")
    return notes
