"""A generated 3.2 GB model and peak-RSS measurement in a fresh process, for the memory test and the bench.

``python -m tests.harness.large_models JOB SRC DST`` runs one measured job and prints its figures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from graphopt import runtime
from graphopt.passes.weight_only import WeightOnlyConfig, WeightOnlyQuantizePass

ROOT = Path(__file__).resolve().parents[2]


def make_large_model(
    folder: Path, *, layers: int = 12, dim: int = 8192, seed: int = 0, dtype: type = np.float32
) -> Path:
    """A chain of ``layers`` MatMuls with ``dim x dim`` weights (float32, or float16 as fp16 exports are) in
    external data, written tensor by tensor."""
    rng = np.random.default_rng(seed)
    path, data = folder / "large.onnx", folder / "large.onnx.data"
    initializers, nodes, previous = [], [], "x"
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    with data.open("wb") as f:
        for i in range(layers):
            weight = rng.standard_normal((dim, dim), dtype=np.float32)
            weight *= np.float32(1.0 / np.sqrt(dim))
            weight = weight.astype(dtype, copy=False)
            offset = f.tell()
            weight.tofile(f)
            tensor = TensorProto(name=f"W{i}", data_type=elem, dims=[dim, dim])
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(weight.nbytes))):
                tensor.external_data.add(key=key, value=value)
            initializers.append(tensor)
            nodes.append(helper.make_node("MatMul", [previous, f"W{i}"], [f"h{i}"], name=f"fc{i}"))
            previous = f"h{i}"
            del weight
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    graph = helper.make_graph(
        nodes,
        "large",
        [helper.make_tensor_value_info("x", elem, ["batch", dim])],
        [helper.make_tensor_value_info("y", elem, ["batch", dim])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    path.write_bytes(model.SerializeToString())
    return path


def _status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return float(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak() -> None:
    """Restart the peak-RSS count here, so that imports (ORT maps and drops ~250 MB) do not count."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def child(job: str, src: str, dst: str) -> None:
    """One measured job in this (fresh) process; prints its figures as JSON."""
    logging.disable(logging.WARNING)
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    import graphopt

    _reset_peak()
    marks = {"baseline": _status_mb("VmRSS")}
    start = time.perf_counter()
    if job == "graphopt":
        model = graphopt.load(src)
        marks["after_load"] = _status_mb("VmHWM")
        WeightOnlyQuantizePass(WeightOnlyConfig())(model)
        marks["after_pass"] = _status_mb("VmHWM")
        graphopt.save(model, dst, protect=[src], external_data=True)
    elif job == "ort":
        quantizer = MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=32, is_symmetric=True)
        quantizer.process()
        quantizer.model.save_model_to_file(dst, use_external_data_format=True)
    elif job == "checker":
        onnx.checker.check_model(src)
    elif job == "ort_load":
        runtime.check_loads(Path(src))
    marks["peak"] = _status_mb("VmHWM")
    print(json.dumps({"seconds": time.perf_counter() - start, **marks}))


def run_child(job: str, src: Path, dst: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "tests.harness.large_models", job, str(src), str(dst)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    child(*sys.argv[1:4])
