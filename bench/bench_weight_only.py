"""graphopt weight_only vs ONNX Runtime's MatMulNBitsQuantizer / MatMulBnb4Quantizer, measured in one run.

Per zoo model, every variant is written to a file and evaluated in ONNX Runtime on the CPU:
size on disk, bits per quantized weight, output cosine to fp32 on the model's evaluation
data (MiniLM: the sentence embedding), latency at batch 1 and 64 (1 thread, all variants of
a model timed interleaved, medians) and the kernels ORT really runs (its optimized graph,
compared with what the pass predicted). Then a generated >= 3 GB model with external data is
quantized in a subprocess each by graphopt and by ORT's quantizer, for wall time and peak RSS
(``--large-dtype float16``: a float16 model of the same size, as fp16 exports are).

    python bench/bench_weight_only.py [--models minilm,transformer] [--runs 20] [--large-gb 3.2]
                                      [--large-dtype float32|float16] [--skip-large] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cosines  # noqa: E402
from graphopt import io, runtime  # noqa: E402
from graphopt.calibration.sources import DataSpec  # noqa: E402
from graphopt.ort_view import observed_kernels  # noqa: E402
from graphopt.passes.weight_only import WeightOnlyConfig, WeightOnlyQuantizePass  # noqa: E402
from graphopt.passes.weight_only.gptq import collect_hessians  # noqa: E402
from models import zoo  # noqa: E402
from tests.harness.large_models import make_large_model, run_child  # noqa: E402

Variant = Callable[[Path, Path], dict[str, object]]
OUTPUT = {"minilm": "sentence_embedding"}
QUANTIZED_OPS = {"MatMulNBits", "MatMulBnb4", "GatherBlockQuantized", "DequantizeLinear"}


def ort_nbits(bits: int, accuracy_level: int | None = None) -> Variant:
    def run(src: Path, dst: Path) -> dict[str, object]:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)), bits=bits, block_size=32, is_symmetric=True, accuracy_level=accuracy_level
        )
        quantizer.process()
        onnx.save(quantizer.model.model, str(dst))
        return {}

    return run


def ort_bnb4(src: Path, dst: Path) -> dict[str, object]:
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

    quantizer = MatMulBnb4Quantizer(onnx.load(str(src)), MatMulBnb4Quantizer.NF4, 64)
    quantizer.process()
    onnx.save(quantizer.model.model, str(dst))
    return {}


def graphopt_variant(name: str, **options: object) -> Variant:
    def run(src: Path, dst: Path) -> dict[str, object]:
        config = WeightOnlyConfig(**options)  # type: ignore[arg-type]
        model = io.load_model(src)
        start = time.perf_counter()
        hessians = collect_hessians(model, DataSpec(source=zoo.calibration_data(name, 64), samples=64), config)
        quantize = WeightOnlyQuantizePass(config, hessians)
        quantize(model)
        seconds = time.perf_counter() - start
        io.save_model(model, dst, protect=[src])
        return {**quantize.details, "seconds": seconds}

    return run


def variants(name: str) -> dict[str, Variant]:
    """Same bits and block size (32; NF4 64), symmetric; ORT's quantizers with their defaults otherwise."""
    matmul = ("MatMul", "Gemm")
    return {
        "ORT RTN int4": ort_nbits(4),
        "ORT RTN int4, accuracy_level 4": ort_nbits(4, 4),
        "graphopt rtn int4": graphopt_variant(name, op_types=matmul),
        "graphopt rtn int4, accuracy_level 4": graphopt_variant(name, op_types=matmul, accuracy_level=4),
        "graphopt gptq int4": graphopt_variant(name, op_types=matmul, method="gptq"),
        "graphopt rtn int4 + embeddings": graphopt_variant(name),
        "graphopt qdq int4": graphopt_variant(name, op_types=matmul, format="qdq"),
        "ORT RTN int8": ort_nbits(8),
        "ORT RTN int8, accuracy_level 4": ort_nbits(8, 4),
        "graphopt rtn int8": graphopt_variant(name, op_types=matmul, bits=8),
        "ORT NF4": ort_bnb4,
        "graphopt nf4": graphopt_variant(name, op_types=matmul, format="nf4"),
        "graphopt gptq nf4": graphopt_variant(name, op_types=matmul, format="nf4", method="gptq"),
    }


def quantized_bits(path: Path) -> float | None:
    """Bits per quantized weight: bytes of everything stored for the quantized kernels, over their weights."""
    model = io.load_model(path)
    producers = {out.name: node for node in model.graph for out in node.outputs}
    seen: set[str] = set()

    def stored_bytes(value: ir.Value | None) -> int | None:
        """Bytes of the constant subgraph computing ``value`` (Cast of scales, absmax dequantization)."""
        if value is None or value.name in seen:
            return 0
        seen.add(value.name)
        if value.const_value is not None:
            return value.const_value.nbytes
        node = producers.get(value.name)
        parts = [stored_bytes(v) for v in node.inputs] if node is not None else [None]
        return None if None in parts else sum(parts)  # type: ignore[arg-type]

    total = params = 0
    for node in model.graph:
        if node.op_type in ("MatMulNBits", "MatMulBnb4"):
            inputs, count = node.inputs[1:], node.attributes.get_int("K") * node.attributes.get_int("N")
        elif node.op_type == "GatherBlockQuantized":
            inputs, count = [node.inputs[0], *node.inputs[2:]], int(np.prod(node.inputs[0].shape.numpy()))  # type: ignore[union-attr]
        elif node.op_type == "DequantizeLinear" and "block_size" in node.attributes:
            inputs, count = list(node.inputs), int(np.prod(node.inputs[0].shape.numpy()))  # type: ignore[union-attr]
        else:
            continue
        total += sum(stored_bytes(v) or 0 for v in inputs)
        params += count
    return 8 * total / params if params else None


def bench_model(name: str, runs: int, workdir: Path) -> list[dict[str, object]]:
    src = zoo.export(name)
    data = zoo.eval_data(name, 64)
    output = OUTPUT.get(name)
    sessions = {"fp32": runtime.create_session(src, threads=1)}
    reference = runtime.run(sessions["fp32"], data.inputs, [output] if output else None)
    rows: list[dict[str, object]] = [{"model": name, "variant": "fp32", "bytes": src.stat().st_size, "cos_mean": 1.0}]
    for label, run in variants(name).items():
        dst = workdir / f"{name}.{label.replace(' ', '_').replace(',', '')}.onnx"
        details = run(src, dst)
        sessions[label] = runtime.create_session(dst, threads=1)
        got = runtime.run(sessions[label], data.inputs, [output] if output else None)
        cos = cosines(next(iter(reference.values())), next(iter(got.values())))
        observed = observed_kernels(dst)
        predicted = details.get("ort_cpu_kernels")
        rows.append(
            {
                "model": name,
                "variant": label,
                "bytes": dst.stat().st_size,
                "bits_per_weight": quantized_bits(dst),
                "cos_mean": float(cos.mean()),
                "cos_min": float(cos.min()),
                "kernels": observed,
                "kernels_predicted_ok": None if predicted is None else predicted == observed,
                "pass_seconds": details.get("seconds"),
            }
        )
    _latency_into(rows, sessions, data.inputs, runs)
    return rows


def _latency_into(rows: list[dict[str, object]], sessions: dict, inputs: dict[str, np.ndarray], runs: int) -> None:
    for batch in (1, 64):
        feeds = {k: v[:batch] for k, v in inputs.items()}
        big = batch > 1  # a MiniLM batch of 64 takes ~1 s: fewer runs, all still interleaved
        latency = runtime.interleaved_latency(
            sessions, feeds, warmup=2 if big else 5, runs=max(5, runs // 4) if big else runs
        )
        for row in rows:
            row[f"ms_b{batch}"] = latency[str(row["variant"])].median_ms


def to_markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| model | variant | size (% fp32) | bits/weight | cosine mean / min | ms b=1 (fp32/x) | ms b=64 (fp32/x) "
        "| ORT CPU kernels (predicted = observed) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    fp32 = {r["model"]: r for r in rows if r["variant"] == "fp32"}
    for r in rows:
        base = fp32[r["model"]]
        bits = f"{r['bits_per_weight']:.3f}" if r.get("bits_per_weight") else "32"
        kernels = ", ".join(f"{k} ×{v}" for k, v in (r.get("kernels") or {}).items()) or "MatMul (float)"
        check = {True: " ✓", False: " ✗", None: ""}[r.get("kernels_predicted_ok")]  # type: ignore[index]
        cos = f"{r['cos_mean']:.5f} / {r.get('cos_min', 1.0):.5f}"
        speed = [f"{r[f'ms_b{b}']:.2f} ({base[f'ms_b{b}'] / r[f'ms_b{b}']:.2f}×)" for b in (1, 64)]
        lines.append(
            f"| {r['model']} | {r['variant']} | {100 * r['bytes'] / base['bytes']:.1f}% | {bits} | {cos} "
            f"| {speed[0]} | {speed[1]} | {kernels}{check} |"
        )
    return "\n".join(lines)


def bench_large(gigabytes: float, workdir: Path, dtype: str = "float32") -> list[dict[str, object]]:
    width = np.dtype(dtype).itemsize
    layers = max(1, round(gigabytes * 1e9 / (width * 8192 * 8192)))
    start = time.perf_counter()
    src = make_large_model(workdir, layers=layers, dtype=np.dtype(dtype).type)
    generated = time.perf_counter() - start
    size = src.stat().st_size + (workdir / "large.onnx.data").stat().st_size
    rows = []
    for job, dst in (("graphopt", workdir / "ours.onnx"), ("ort", workdir / "ort.onnx")):
        (workdir / job).mkdir(exist_ok=True)
        try:
            result = run_child(job, src, workdir / job / dst.name)
        except subprocess.CalledProcessError as error:  # ORT's quantizer may refuse a dtype: say so
            last = (error.stderr or "").strip().splitlines()[-1:] or [f"exit {error.returncode}"]
            rows.append({"job": job, "input_bytes": size, "failed": last[0][:160]})
            continue
        out_bytes = sum(p.stat().st_size for p in (workdir / job).iterdir())
        rows.append({"job": job, "input_bytes": size, "output_bytes": out_bytes, "generate_s": generated, **result})
    ours = workdir / "graphopt" / "ours.onnx"
    for job in ("checker", "ort_load"):
        rows.append({"job": f"{job} of graphopt output", **run_child(job, ours, ours)})
    rows.append({"job": f"ort_load of the {dtype} input", **run_child("ort_load", src, src)})
    for row in rows:
        row["largest_tensor_mb"] = width * 8192 * 8192 / 2**20
    return rows


def large_markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| job | input → output | wall (s) | peak RSS above baseline (MB) | milestones (MB above baseline) |"]
    lines.append("|---|---:|---:|---:|---|")
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['job']} | failed: {r['failed']} | | | |")
            continue
        base = float(r["baseline"])  # type: ignore[arg-type]
        marks = ", ".join(f"{k} {float(r[k]) - base:.0f}" for k in ("after_load", "after_pass") if k in r)
        sizes = f"{r['input_bytes'] / 1e9:.2f} GB → {r['output_bytes'] / 1e9:.2f} GB" if "input_bytes" in r else ""
        lines.append(f"| {r['job']} | {sizes} | {r['seconds']:.1f} | {float(r['peak']) - base:.0f} | {marks} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,transformer")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--large-gb", type=float, default=3.2)
    parser.add_argument("--large-dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--json", help="write all rows as JSON here")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in filter(None, args.models.split(",")):  # --models "" runs the large model only
            rows.extend(bench_model(name, args.runs, Path(tmp)))
    print(to_markdown(rows))
    large: list[dict[str, object]] = []
    if not args.skip_large:
        with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
            if shutil.disk_usage(tmp).free < 3 * args.large_gb * 1e9:
                print("\n(large model skipped: not enough free disk)")
            else:
                large = bench_large(args.large_gb, Path(tmp), args.large_dtype)
                print("\n" + large_markdown(large))
    if args.json:
        Path(args.json).write_text(json.dumps({"models": rows, "large": large}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
