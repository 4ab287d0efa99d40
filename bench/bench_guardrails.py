"""Accuracy guardrails: a recipe that breaks the budget, rescued by the fallback.

For the digits CNN and MiniLM: minmax int8 recipes (SCENARIOS) with budgets they break;
graphopt's fallback re-calibrates, then keeps the fewest layers (or tensors) in float.
Compared, in the same run, with ORT quantize_static at each calibrate_method (same
calibration samples). Then the cost of the layer-wise comparison
against a plain verification, in time and peak memory, each in its own process.

    python bench/bench_guardrails.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_quantize import calibration_file, evaluate, run_job  # noqa: E402
from bench.common import rss_mb  # noqa: E402
from models import zoo  # noqa: E402

# Recipes that break their budgets. CNN: every listed op and output quantized ORT's way with
# minmax (islands off, no sentinel guard), once with 8-bit weights (ORT's default) against a
# near-lossless budget, once with 7-bit weights against a budget only a float layer meets;
# MiniLM: graphopt's own placement with minmax ranges.
ORT_WAY = {"method": "minmax", "islands": False, "max_abs_range": 1e38}
SCENARIOS = {
    "cnn": [
        ("8-bit weights", {**ORT_WAY, "reduce_range": False}, {"min_cosine": 0.999}),
        ("7-bit weights", ORT_WAY, {"min_cosine": 0.9999}),
    ],
    "minilm": [("minmax", {"method": "minmax"}, {"min_cosine_mean": 0.99, "outputs": ["sentence_embedding"]})],
}


def run_graphopt(
    name: str, label: str, quantize: dict[str, object], budget: dict[str, object], folder: Path, calib: Path
) -> tuple[Path, dict[str, object]]:
    import graphopt
    from graphopt.calibration.sources import DataSpec

    eval_npz = folder / f"{name}_eval.npz"
    data = zoo.eval_data(name, n=64)
    np.savez(eval_npz, **{k: v[:64] for k, v in data.inputs.items()})
    samples = 64 if name == "cnn" else 32  # each fallback trial verifies on these
    recipe = {
        "passes": ["fold", {"quantize": quantize}, "fold", "tune"],
        "verify": {"data": str(eval_npz), "samples": samples, "batch_size": 16, "latency_runs": 0, "layerwise": False},
        "budget": budget,
        "fallback": {"max_candidates": 24},
    }
    start = time.perf_counter()
    result = graphopt.optimize(zoo.export(name), recipe, calibration=DataSpec(source=str(calib), samples=64))
    seconds = time.perf_counter() - start
    out = folder / f"{name}.graphopt.{label.replace(' ', '_')}.onnx"
    graphopt.save(result.model, out)
    fallback = result.report.fallback or {}
    return out, {
        "float_layers": len(fallback.get("float_nodes", [])),
        "float_nodes": fallback.get("float_nodes", []),
        "changed": fallback.get("changed", {}),
        "alternatives": fallback.get("alternatives", {}),
        "timed": fallback.get("timed", {}),
        "trials": fallback.get("trials", 0),
        "optimize_s": seconds,
        "budget": budget,
        "recipe": quantize,
    }


def guardrail_rows(name: str, folder: Path) -> list[dict[str, object]]:
    """Every scenario of ``name`` and ORT's outputs, evaluated (and timed) together."""
    calib = calibration_file(name, folder)
    src = zoo.export(name)
    paths, infos = {}, {}
    for label, quantize, budget in SCENARIOS[name]:
        tool = f"graphopt {label} + fallback"
        paths[tool], infos[tool] = run_graphopt(name, label, quantize, budget, folder, calib)
    for method in ("MinMax", "Percentile", "Entropy"):
        dst = folder / f"{name}.ort.{method}.onnx"
        if isinstance(run_job("ort", src, dst, calib, method), dict):
            paths[f"ort {method}"] = dst
    metrics = evaluate(name, src, paths)
    return [{"model": name, "tool": label, **row, **infos.get(label, {})} for label, row in metrics.items()]


def job_cost(kind: str, reference: str, candidate: str, data: str) -> None:
    import graphopt
    from graphopt import localize, verify
    from graphopt.calibration.sources import DataSpec

    ref, cand = graphopt.load(reference), graphopt.load(candidate)
    spec = DataSpec(source=data, samples=64, batch_size=16)
    baseline, start = rss_mb(), time.perf_counter()
    if kind == "verify":
        verify.verify_models(ref, cand, spec)
    else:
        localize.layer_errors(ref, cand, spec)
    peak = rss_mb()
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_mb": peak, "baseline_mb": baseline}))


def cost_rows(folder: Path) -> list[dict[str, object]]:
    reference, candidate = zoo.export("minilm"), folder / "minilm.graphopt.minmax.onnx"
    data = folder / "minilm_eval.npz"
    rows = []
    for kind in ("verify", "layerwise"):
        cmd = [sys.executable, __file__, "--cost", kind, str(reference), str(candidate), str(data)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
        rows.append({"kind": kind, **json.loads(done.stdout.strip().splitlines()[-1])})
    return rows


def to_markdown(rows: list[dict[str, object]], costs: list[dict[str, object]]) -> str:
    lines = [
        "| model | tool | budget | accuracy | cosine mean / min | latency ms | size "
        "| fallback: calibration · float (trials) |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    sizes = {r["model"]: r["bytes"] for r in rows if r["tool"] == "fp32"}
    for r in rows:
        acc = f"{100 * r['accuracy']:.2f}%" if "accuracy" in r else "–"
        fl = "–"
        if "float_layers" in r:
            changed = ", ".join(f"{k}={v}" for k, v in r["changed"].items()) or "as given"
            floats = ", ".join(r["float_nodes"]) or "none"
            fl = f"{changed} · {floats} ({r['trials']})"
        budget = ", ".join(f"{k} {v}" for k, v in r.get("budget", {}).items() if k != "outputs") or "–"
        lines.append(
            f"| {r['model']} | {r['tool']} | {budget} | {acc} | {r['cos_mean']:.4f} / {r['cos_min']:.4f} "
            f"| {r['latency_ms']:.3f} | {r['bytes'] / sizes[r['model']]:.1%} | {fl} |"
        )
    verify_cost, layer_cost = costs
    lines += [
        "",
        "| MiniLM, 64 sentences | time (s) | peak RSS (MB) |",
        "|---|---:|---:|",
        f"| plain verification | {verify_cost['seconds']:.2f} | {verify_cost['peak_mb']:.0f} |",
        f"| layer-wise comparison | {layer_cost['seconds']:.2f} | {layer_cost['peak_mb']:.0f} |",
        f"| ratio | {layer_cost['seconds'] / verify_cost['seconds']:.2f}× | "
        f"{layer_cost['peak_mb'] / verify_cost['peak_mb']:.2f}× |",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json")
    parser.add_argument("--cost", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cost:
        job_cost(*args.cost)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = guardrail_rows("cnn", folder) + guardrail_rows("minilm", folder)
        costs = cost_rows(folder)
    print(to_markdown(rows, costs))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "costs": costs}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
