"""graphopt quantize vs ONNX Runtime quantize_static, same models, same calibration samples.

Each quantization runs in its own process (file in -> quantized file out, pre-processing
included) so its wall time and peak RSS are its own. Then every output is evaluated in
ONNX Runtime on the CPU: accuracy against fp32 (digits test accuracy, embedding cosine),
latency (1 thread, all models of one row group timed interleaved, medians) and size.

    python bench/bench_quantize.py [--models cnn,minilm,transformer] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cosines, rss_mb  # noqa: E402
from models import zoo  # noqa: E402

GRAPHOPT_METHODS = ("percentile", "entropy", "mse", "minmax")
# Ablations (options after the method): what a default is worth, measured in the same run.
ABLATIONS = {
    # ORT's placement and 8-bit weights; weights rounded to nearest instead of by GPTQ
    "cnn": ("minmax,islands=false,reduce_range=false", "minmax,rounding=nearest"),
    # no float outlier channels; no SmoothQuant; weights rounded to nearest instead of by GPTQ
    "minilm": ("minmax,outliers=0", "minmax,smooth=false", "minmax,rounding=nearest"),
}
ORT_METHODS = ("MinMax", "Percentile", "Entropy")
BATCH = {"cnn": 64, "mlp": 64, "transformer": 16, "minilm": 8}


def job_graphopt(src: str, dst: str, calib: str, method: str) -> None:
    import graphopt
    from graphopt.calibration.sources import DataSpec

    baseline, start = rss_mb(), time.perf_counter()
    model = graphopt.load(src)
    data = DataSpec(source=calib, samples=10_000, batch_size=1)
    graphopt.Pipeline(graphopt.recipe.parse_passes(["fold", f"quantize:method={method}"])).run(model, calibration=data)
    seconds, peak = time.perf_counter() - start, rss_mb()
    # tune times ORT sessions (latency, not quantization), so it runs after the cost is taken.
    graphopt.Pipeline(graphopt.recipe.parse_passes(["tune"])).run(model, calibration=data)
    graphopt.save(model, dst, protect=[src])
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "baseline_rss_mb": baseline}))


def job_ort(src: str, dst: str, calib: str, method: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            with np.load(calib) as data:
                arrays = {k: data[k] for k in data.files}
            count = len(next(iter(arrays.values())))
            self.samples = iter([{k: v[i : i + 1] for k, v in arrays.items()} for i in range(count)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.samples, None)

    baseline, start = rss_mb(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        # ORT's recommended pre-processing; its symbolic shape inference fails on MiniLM.
        pre = str(Path(tmp) / "pre.onnx")
        quant_pre_process(src, pre, skip_symbolic_shape=True)
        quantize_static(
            pre,
            dst,
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=getattr(CalibrationMethod, method),
        )
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": rss_mb(), "baseline_rss_mb": baseline}))


def calibration_file(name: str, folder: Path) -> Path:
    """Calibration samples stacked on axis 0, padded to one length (ORT's histograms need it)."""
    samples = zoo.calibration_data(name, n=128 if name in ("cnn", "mlp") else 64)
    arrays = {}
    for key in samples[0]:
        parts = [s[key] for s in samples]
        if parts[0].ndim == 2 and parts[0].dtype == np.int64:  # token ids/masks: pad the sequence axis
            length = max(p.shape[1] for p in parts)
            parts = [np.pad(p, ((0, 0), (0, length - p.shape[1]))) for p in parts]
        arrays[key] = np.concatenate(parts)
    path = folder / f"{name}_calib.npz"
    np.savez(path, **arrays)
    return path


def run_job(tool: str, src: Path, dst: Path, calib: Path, method: str) -> dict[str, float] | str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--job", tool, str(src), str(dst), str(calib), method]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if done.returncode != 0:
        return done.stderr.strip().splitlines()[-1][:160] if done.stderr.strip() else f"exit {done.returncode}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def evaluate(name: str, reference: Path, paths: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Accuracy vs fp32 (and labels), latency (interleaved, 1 thread) and size of each output."""
    from graphopt import runtime

    data = zoo.eval_data(name)
    sessions = {"fp32": runtime.create_session(str(reference), threads=1)}
    sessions.update({label: runtime.create_session(str(p), threads=1) for label, p in paths.items()})
    output = "sentence_embedding" if name == "minilm" else sessions["fp32"].get_outputs()[0].name
    results = {label: runtime.run(s, data.inputs, [output])[output] for label, s in sessions.items()}
    feeds = {k: v[: BATCH[name]] for k, v in data.inputs.items()}
    latency = runtime.interleaved_latency(sessions, feeds, warmup=5, runs=30 if name == "minilm" else 300)
    rows = {}
    for label, out in results.items():
        cosine = cosines(results["fp32"], out)
        row = {"cos_mean": float(cosine.mean()), "cos_min": float(cosine.min()), "latency_ms": latency[label].median_ms}
        if data.labels is not None:
            row["accuracy"] = float(np.mean(np.argmax(out, axis=-1) == data.labels))
        row["bytes"] = (reference if label == "fp32" else paths[label]).stat().st_size
        row["int8_bytes"] = _int8_bytes(reference if label == "fp32" else paths[label])
        rows[label] = row
    return rows


def _int8_bytes(path: Path) -> int:
    """Bytes of int8/uint8 initializer data: the floor a file of 8-bit weights cannot go under."""
    import onnx

    model = onnx.load(str(path))
    small = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    return sum(len(t.raw_data) or len(t.int32_data) for t in model.graph.initializer if t.data_type in small)


def bench_model(name: str, folder: Path) -> list[dict[str, object]]:
    src = zoo.export(name)
    calib = calibration_file(name, folder)
    graphopt_jobs = [*GRAPHOPT_METHODS, *ABLATIONS.get(name, ())]
    jobs = [("graphopt", m) for m in graphopt_jobs] + [("ort", m) for m in ORT_METHODS]
    costs, paths = {}, {}
    for tool, method in jobs:
        label = f"{tool} {method}"
        dst = folder / f"{name}.{tool}.{method.replace(',', '_').replace('=', '-')}.onnx"
        costs[label] = run_job(tool, src, dst, calib, method)
        if isinstance(costs[label], dict):
            paths[label] = dst
    metrics = evaluate(name, src, paths)
    rows = []
    for label in ["fp32", *costs]:
        row: dict[str, object] = {"model": name, "tool": label}
        if isinstance(costs.get(label), str):
            row["error"] = costs[label]
        else:
            row.update(metrics[label])
            row.update(costs.get(label, {}))
        rows.append(row)
    return rows


def to_markdown(rows: list[dict[str, object]]) -> str:
    head = (
        "| model | tool · calibration | accuracy | cosine mean / min | latency ms | size vs fp32 | 8-bit data vs fp32 "
        "| quantize s | peak RSS MB |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    sizes = {r["model"]: r["bytes"] for r in rows if r["tool"] == "fp32"}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tool']} | failed: {r['error']} | | | | | | |")
            continue
        acc = f"{100 * r['accuracy']:.2f}%" if "accuracy" in r else "–"
        cost = f"{r['seconds']:.1f} | {r['peak_rss_mb']:.0f}" if "seconds" in r else "– | –"
        lines.append(
            f"| {r['model']} | {r['tool']} | {acc} | {r['cos_mean']:.4f} / {r['cos_min']:.4f} | {r['latency_ms']:.3f} "
            f"| {r['bytes'] / sizes[r['model']]:.1%} | {r['int8_bytes'] / sizes[r['model']]:.1%} | {cost} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn,transformer,minilm")
    parser.add_argument("--json")
    parser.add_argument("--job", nargs=5, metavar=("TOOL", "SRC", "DST", "CALIB", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.job:
        tool, *rest = args.job
        (job_graphopt if tool == "graphopt" else job_ort)(*rest)
        return 0
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.extend(bench_model(name, Path(tmp)))
    print(to_markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
