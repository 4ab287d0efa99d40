"""Pruning on the zoo models: structured latency/accuracy, 2:4 scorings, and bytes on disk.

Every figure is measured in this run against the dense model of the same run:

* structured: the digits CNN with 30% / 50% of its prunable channels removed, with and
  without least-squares recovery (test accuracy, latency ratio on 1 thread, interleaved,
  medians); the zoo transformer and MiniLM with 50% of their MLP neurons (and of their
  attention heads) removed (output cosine similarity, latency ratio);
* 2:4: magnitude, Wanda and SparseGPT on the zoo transformer and MiniLM (output cosine);
* storage: file bytes with pruned weights stored dense, or as int64 COO sparse
  initializers, at 2:4 and at 90% unstructured sparsity.

    python bench/bench_prune.py [--models cnn,transformer,minilm] [--runs 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import graphopt
from bench.common import cosines
from graphopt import io, recipe, runtime, verify
from models import zoo

Row = dict[str, Any]
# The output compared by cosine similarity, per model (one row per sample).
COSINE_OUTPUT = {"transformer": "hidden", "minilm": "sentence_embedding"}
CALIBRATION_SAMPLES = {"cnn": 256, "transformer": 128, "minilm": 95}
LATENCY_SAMPLES = {"cnn": 540, "transformer": 16, "minilm": 32}


def optimized(model: ir.Model, steps: Sequence[str], name: str) -> tuple[ir.Model, list[Any], float]:
    """A pruned copy of ``model``, the pass records and the seconds the pipeline took."""
    candidate = model.clone()
    calibration = graphopt.DataSpec(source=zoo.calibration_data(name, CALIBRATION_SAMPLES[name]), samples=1 << 16)
    start = time.perf_counter()
    records = graphopt.Pipeline(recipe.parse_passes(list(steps)), check=True).run(candidate, calibration=calibration)
    return candidate, records, time.perf_counter() - start


def latency_ratio(dense: ir.Model, candidate: ir.Model, feeds: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    sessions = {
        "dense": runtime.create_session(dense, threads=1),
        "pruned": runtime.create_session(candidate, threads=1),
    }
    lat = runtime.interleaved_latency(sessions, feeds, runs=runs)
    return {
        "dense_ms": lat["dense"].median_ms,
        "pruned_ms": lat["pruned"].median_ms,
        "latency_ratio": lat["pruned"].median_ms / lat["dense"].median_ms,
    }


def cosine(reference: np.ndarray, candidate: ir.Model, feeds: dict[str, np.ndarray], output: str) -> float:
    """Mean over samples of the cosine similarity of ``candidate``'s output to the dense model's."""
    return float(np.mean(cosines(reference, runtime.run(runtime.create_session(candidate), feeds, [output])[output])))


def dense_output(dense: ir.Model, feeds: dict[str, np.ndarray], output: str) -> np.ndarray:
    return runtime.run(runtime.create_session(dense), feeds, [output])[output]


def bench_cnn(runs: int) -> list[Row]:
    dense = io.load_model(zoo.export("cnn"))
    data = zoo.eval_data("cnn")
    base = verify.label_accuracy(dense, data.inputs, data.labels)
    rows = []
    for ratio, round_to, recover in [
        (0.3, 1, False),
        (0.3, 1, True),
        (0.3, 8, True),
        (0.5, 8, False),
        (0.5, 8, True),
    ]:
        step = (
            f"prune_structured:ratio={ratio},round_to={round_to},importance=activation,recover={str(recover).lower()}"
        )
        candidate, records, seconds = optimized(dense, [step, "fold"], "cnn")
        details = records[0].details
        accuracy = verify.label_accuracy(candidate, data.inputs, data.labels)
        rows.append(
            {
                "section": "structured",
                "model": "cnn",
                "setting": f"{ratio:.0%} channels, round_to={round_to}",
                "recover": recover,
                "removed": details["channels_removed"] / details["channels_total"],
                "params": f"{details['parameters_before']} → {details['parameters_after']}",
                "quality": f"acc {accuracy:.3f} ({(accuracy - base) * 100:+.1f} pt vs {base:.3f})",
                "accuracy": accuracy,
                "dense_accuracy": base,
                "seconds": seconds,
                **latency_ratio(dense, candidate, data.inputs, runs),
                "batch": len(data.labels),
            }
        )
    return rows


def bench_transformer_structured(name: str, runs: int) -> list[Row]:
    dense = io.load_model(zoo.export(name))
    feeds = zoo.eval_data(name, n=64 if name == "minilm" else None).inputs
    timing = {k: v[: LATENCY_SAMPLES[name]] for k, v in feeds.items()}
    reference = dense_output(dense, feeds, COSINE_OUTPUT[name])
    rows = []
    for kinds in ("mlp", "heads"):
        for recover in (False, True):
            step = f"prune_structured:ratio=0.5,kinds=[{kinds}],importance=activation,recover={str(recover).lower()}"
            candidate, records, seconds = optimized(dense, [step, "fold"], name)
            details = records[0].details
            score = cosine(reference, candidate, feeds, COSINE_OUTPUT[name])
            rows.append(
                {
                    "section": "structured",
                    "model": name,
                    "setting": f"50% {'MLP neurons' if kinds == 'mlp' else 'attention heads'}",
                    "recover": recover,
                    "removed": details["channels_removed"] / details["channels_total"],
                    "params": f"{details['parameters_before']} → {details['parameters_after']}",
                    "quality": f"cos {score:.4f}",
                    "cosine": score,
                    "seconds": seconds,
                    **latency_ratio(dense, candidate, timing, runs),
                    "batch": len(next(iter(timing.values()))),
                }
            )
    return rows


def bench_two_four(name: str) -> list[Row]:
    dense = io.load_model(zoo.export(name))
    feeds = zoo.eval_data(name, n=64 if name == "minilm" else None).inputs
    reference = dense_output(dense, feeds, COSINE_OUTPUT[name])
    rows = []
    for method in ("magnitude", "wanda", "sparsegpt"):
        candidate, records, seconds = optimized(dense, [f"prune:pattern=n:m,method={method}"], name)
        rows.append(
            {
                "section": "2:4",
                "model": name,
                "method": method,
                "layers": records[0].details["layers_pruned"],
                "sparsity": records[0].details["sparsity"],
                "cosine": cosine(reference, candidate, feeds, COSINE_OUTPUT[name]),
                "seconds": seconds,
            }
        )
    return rows


def bench_storage(name: str, workdir: Path) -> list[Row]:
    dense = io.load_model(zoo.export(name))
    rows = []
    for label, step in (("2:4", "prune:pattern=n:m"), ("90% unstructured", "prune:sparsity=0.9")):
        candidate = dense.clone()
        records = graphopt.Pipeline(recipe.parse_passes([step])).run(candidate)
        sizes = {}
        for mode in ("never", "always", "auto"):
            saved = io.save_model(candidate, workdir / f"{name}.{mode}.onnx", sparse=mode)
            sizes[mode] = saved.bytes_on_disk
        details = records[0].details
        rows.append(
            {
                "section": "storage",
                "model": name,
                "pattern": label,
                "weight_sparsity": details["sparsity"],
                "dense_bytes": sizes["never"],
                "sparse_bytes": sizes["always"],
                "auto_bytes": sizes["auto"],
                "pruned_weight_bytes": details["weight_bytes_dense"],
                "pruned_weight_coo_bytes": details["weight_bytes_coo_int64"],
            }
        )
    return rows


def markdown(rows: list[Row]) -> str:
    out = ["### Structured pruning (1 thread, interleaved medians; latency = pruned / dense)", ""]
    out += [
        "| model | removed | recovery | params | quality | latency ratio (batch) | pass s |",
        "|---|---|---|---|---|---:|---:|",
    ]
    for r in (r for r in rows if r["section"] == "structured"):
        out.append(
            f"| {r['model']} | {r['setting']} ({r['removed']:.0%}) | {'yes' if r['recover'] else 'no'} | {r['params']} "
            f"| {r['quality']} | {r['latency_ratio']:.2f}× ({r['batch']}) | {r['seconds']:.1f} |"
        )
    out += ["", "### 2:4 sparsity: output cosine similarity to the dense model", ""]
    out += ["| model | method | layers | sparsity | cosine | pass s |", "|---|---|---:|---:|---:|---:|"]
    for r in (r for r in rows if r["section"] == "2:4"):
        out.append(
            f"| {r['model']} | {r['method']} | {r['layers']} | {r['sparsity']:.2f} | {r['cosine']:.4f} "
            f"| {r['seconds']:.1f} |"
        )
    out += ["", "### Bytes on disk: pruned weights dense vs int64 COO sparse initializers", ""]
    out += [
        "| model | pattern | pruned weights (dense → COO) | file, dense | file, sparse=always | file, sparse=auto |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in (r for r in rows if r["section"] == "storage"):
        out.append(
            f"| {r['model']} | {r['pattern']} | {r['pruned_weight_bytes']:,} → {r['pruned_weight_coo_bytes']:,} "
            f"| {r['dense_bytes']:,} | {r['sparse_bytes']:,} | {r['auto_bytes']:,} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="cnn,transformer,minilm")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model for latency")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    names = args.models.split(",")
    rows: list[Row] = []
    if "cnn" in names:
        rows += bench_cnn(args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        for name in (n for n in names if n != "cnn"):
            rows += bench_transformer_structured(name, args.runs)
            rows += bench_two_four(name)
            rows += bench_storage(name, Path(tmp))
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
