"""fold vs onnxslim vs onnxsim on the zoo models and MiniLM, measured in one run.

For each model, every tool reads the same exported file and writes its output; we count
nodes (main graph, subgraphs and functions), time the whole file-to-file run (median of
``--repeats``, tools interleaved so machine noise hits them alike) and check each output
against the input in ONNX Runtime on the model's evaluation data.

    python bench/bench_fold.py [--models mlp,cnn,...] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import graphopt
from models import zoo

Tool = Callable[[Path, Path], None]


def run_graphopt(src: Path, dst: Path) -> None:
    model = graphopt.load(src)
    graphopt.Pipeline(graphopt.recipe.parse_passes(["fold"])).run(model)
    graphopt.save(model, dst, protect=[src])


def run_onnxslim(src: Path, dst: Path) -> None:
    import onnxslim

    with contextlib.redirect_stdout(io.StringIO()):  # onnxslim prints a summary table per call
        onnxslim.slim(str(src), str(dst))


def run_onnxsim(src: Path, dst: Path) -> None:
    import onnxsim

    simplified, ok = onnxsim.simplify(onnx.load(str(src)))
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    onnx.save(simplified, str(dst))


TOOLS: dict[str, Tool] = {"graphopt fold": run_graphopt, "onnxslim": run_onnxslim, "onnxsim": run_onnxsim}


def count_nodes(path: Path) -> int:
    model = onnx.load(str(path))

    def graph_nodes(graph: onnx.GraphProto) -> int:
        total = 0
        for node in graph.node:
            total += 1
            for attr in node.attribute:
                total += graph_nodes(attr.g) if attr.HasField("g") else 0
                total += sum(graph_nodes(g) for g in attr.graphs)
        return total

    return graph_nodes(model.graph) + sum(len(f.node) for f in model.functions)


def max_error(reference: Path, candidate: Path, feeds: dict[str, np.ndarray]) -> float:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ref = ort.InferenceSession(str(reference), options, providers=["CPUExecutionProvider"])
    cand = ort.InferenceSession(str(candidate), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in ref.get_outputs()]
    worst = 0.0
    for a, b in zip(ref.run(names, feeds), cand.run(names, feeds), strict=True):
        worst = max(worst, float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))))
    return worst


def bench_model(name: str, repeats: int, workdir: Path) -> list[dict[str, object]]:
    src = zoo.export(name)
    data = zoo.eval_data(name, n=8)
    feeds = {k: v[:8] for k, v in data.inputs.items()}
    times: dict[str, list[float]] = {tool: [] for tool in TOOLS}
    outputs = {tool: workdir / f"{name}.{tool.replace(' ', '_')}.onnx" for tool in TOOLS}
    failed: dict[str, str] = {}
    for _ in range(repeats):
        for tool, run in TOOLS.items():
            if tool in failed:
                continue
            start = time.perf_counter()
            try:
                run(src, outputs[tool])
            except Exception as exc:  # a competitor failing is a result, not a crash
                failed[tool] = f"{type(exc).__name__}: {exc}"[:120]
                continue
            times[tool].append(time.perf_counter() - start)
    rows = []
    base_time = statistics.median(times["onnxslim"]) if times["onnxslim"] else float("nan")
    for tool in TOOLS:
        if tool in failed:
            rows.append({"model": name, "tool": tool, "error": failed[tool]})
            continue
        seconds = statistics.median(times[tool])
        rows.append(
            {
                "model": name,
                "tool": tool,
                "nodes_in": count_nodes(src),
                "nodes_out": count_nodes(outputs[tool]),
                "seconds": seconds,
                "time_vs_onnxslim": seconds / base_time,
                "max_abs_error": max_error(src, outputs[tool], feeds),
            }
        )
    return rows


def to_markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| model | tool | nodes in → out | wall time (s, median) | time / onnxslim | max abs error vs input |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['tool']} | failed: {r['error']} | | | |")
            continue
        lines.append(
            f"| {r['model']} | {r['tool']} | {r['nodes_in']} → {r['nodes_out']} | {r['seconds']:.3f} "
            f"| {r['time_vs_onnxslim']:.2f}× | {r['max_abs_error']:.2g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(zoo.ZOO_NAMES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows.extend(bench_model(name, args.repeats, Path(tmp)))
    print(to_markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
