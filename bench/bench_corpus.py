"""The real-model corpus through graphopt's recipes, beside onnxslim, onnxsim and ONNX Runtime's quantizer.

For every corpus model (or the NAMES given), each job (tool or recipe) runs in its own process with a timeout, so
a crash or a hang is a row of the table, not the end of the bench. Jobs (``--passes``, default all):

    fold onnxslim onnxsim                         exact: nodes, wall time, parity (rel L2 vs fp32)
    default quantize weight_only fp16 prune24 prune_structured   graphopt, lossy: task metric vs fp32
    quantize_nearest quantize_nosmooth            ablations: quantize with round-to-nearest weights (no GPTQ), or
                                                  without SmoothQuant
    quantize_noverify                             quantize file to file without verification (time, memory)
    ort_s8 ort_u8 ort_u8_ops                      ORT quantize_static QDQ per channel (int8 / uint8 activations,
                                                  uint8 with Conv/MatMul/Gemm only)

Calibration uses the model's calibration samples, metrics its evaluation samples (disjoint seeds). Latency is the
median over samples of candidate / fp32 with 1 intra-op thread, the two timed in alternation.

    python bench/bench_corpus.py [NAMES...] [--passes fold,quantize] [--out results.json] [--timeout 900]
    python bench/bench_corpus.py --tables results.json      # the tables again, from a finished or stopped run
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.corpus_jobs import TOOLS, Row, base_row, first_line, run_job  # noqa: E402
from models import corpus  # noqa: E402
from models.corpus.base import CorpusModel  # noqa: E402
from models.corpus.fetch import fetch, load_inputs  # noqa: E402


def _job_command(model: CorpusModel, key: str, workdir: Path, result: Path, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable,
        str(Path(__file__).resolve()),
        model.name,
        "--job",
        key,
        "--result",
        str(result),
        "--workdir",
        str(workdir),
        "--cache",
        str(args.cache),
        "--latency-runs",
        str(args.latency_runs),
        "--latency-samples",
        str(args.latency_samples),
    ]


def spawn(model: CorpusModel, key: str, workdir: Path, args: argparse.Namespace) -> Row:
    """Run one job in a child process; a timeout or a crash becomes the row's error."""
    result = workdir / f"{model.name}.{key}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    try:
        done = subprocess.run(
            _job_command(model, key, workdir, result, args),
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=args.timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {**base_row(model, key), "error": f"timeout after {args.timeout} s", "seconds": float(args.timeout)}
    if result.is_file():
        return json.loads(result.read_text())
    code = done.returncode
    why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
    tail = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return {**base_row(model, key), "error": f"{why}: {tail[-1][:240] if tail else 'no output'}"}


def bench_model(model: CorpusModel, keys: Sequence[str], workdir: Path, args: argparse.Namespace) -> list[Row]:
    try:  # the parent fetches and makes inputs once; the children read the cache
        fetch(model, args.cache, offline=corpus.offline())
        for split in ("calib", "eval"):
            load_inputs(model, args.cache, split, offline=corpus.offline())
    except Exception as exc:  # a model that cannot be fetched is still a row per job
        return [{**base_row(model, key), "error": f"fetch/inputs: {first_line(exc)}"} for key in keys]
    rows = []
    for key in keys:
        row = spawn(model, key, workdir, args)
        print(
            f"  {model.name:24s} {row['tool']:30s} {'ok' if 'error' not in row else row['error'][:100]}",
            file=sys.stderr,
            flush=True,
        )
        rows.append(row)
    return rows


def job_main(args: argparse.Namespace) -> int:
    """Child process: one job, its row written as JSON to --result."""
    model = corpus.get(args.names[0])
    src = fetch(model, args.cache, offline=True)
    calib = load_inputs(model, args.cache, "calib", offline=True)
    feeds = load_inputs(model, args.cache, "eval", offline=True)
    row = run_job(model, args.job, src, args.workdir, calib, feeds, args)
    args.result.write_text(json.dumps(row, default=str))
    return 0


def _fmt(value: Any, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def _stages(row: Row) -> str:
    return "/".join("✓" if row.get(k) else "✗" for k in ("loaded", "ran", "valid"))


def _error(row: Row) -> str:
    return str(row.get("error", "")).replace("|", "/").replace("\n", " ")[:220]


def fold_table(rows: list[Row]) -> str:
    lines = [
        "| model | tool | load/run/valid | nodes in → out | wall s | time / graphopt fold | rel L2 vs fp32 "
        "| rel L2, ORT rewrites on | checker | latency ratio | error |",
        "|---|---|:---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    fold = {r["model"]: r.get("seconds") for r in rows if r["key"] == "fold" and "error" not in r}
    for r in rows:
        nodes = f"{r['nodes_in']} → {r['nodes_out']}" if "nodes_out" in r else "–"
        vs = r.get("seconds") / fold[r["model"]] if r.get("seconds") and fold.get(r["model"]) else None
        lines.append(
            f"| {r['model']} | {r['tool']} | {_stages(r)} | {nodes} | {_fmt(r.get('seconds'), '.2f')} "
            f"| {_fmt(vs, '.2f', '×')} | {_fmt(r.get('rel_l2'), '.1e')} | {_fmt(r.get('rel_l2_deployed'), '.1e')} "
            f"| {r.get('checker', '–')} "
            f"| {_fmt(r.get('latency_ratio'), '.2f')} | {_error(r)} |"
        )
    return "\n".join(lines)


def lossy_table(rows: list[Row], title: str) -> str:
    lines = [
        f"| model | {title} | load/run/valid | metric | score vs fp32 (goal) | graphopt verify | latency ratio "
        "| size ratio | wall s | error |",
        "|---|---|:---:|---|---:|---|---:|---:|---:|---|",
    ]
    for r in rows:
        score = r.get("score")
        mark = "" if score is None else (" ✓" if score >= r["goal"] else " ✗")
        note = f"{r.get('note', '')} {_error(r)}".strip()
        lines.append(
            f"| {r['model']} | {r['tool']} | {_stages(r)} | {r['metric']} "
            f"| {_fmt(score, '.4f')} ({r['goal']:g}){mark} | {str(r.get('graphopt_verify', '–'))[:60]} "
            f"| {_fmt(r.get('latency_ratio'), '.2f')} | {_fmt(r.get('size_ratio'), '.2f')} "
            f"| {_fmt(r.get('seconds'), '.1f')} | {note} |"
        )
    return "\n".join(lines)


def report(rows: list[Row]) -> str:
    by_section = {s: [r for r in rows if r["section"] == s] for s in ("fold", "lossy", "ort")}
    parts = []
    if by_section["fold"]:
        title = "## Fold parity (exact: rel L2 vs fp32, ORT graph rewrites and weight pre-packing off)"
        parts += [title, fold_table(by_section["fold"])]
    if by_section["lossy"]:
        parts += [
            "## graphopt lossy passes (task metric vs fp32 on eval samples)",
            lossy_table(by_section["lossy"], "recipe"),
        ]
    if by_section["ort"]:
        parts += [
            "## ORT quantize_static anchors (QDQ, per channel, MinMax)",
            lossy_table(by_section["ort"], "variant"),
        ]
    return "\n\n".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="corpus model names (default: all)")
    parser.add_argument("--passes", default=",".join(TOOLS), help=f"jobs to run, from: {', '.join(TOOLS)}")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here (updated after every model)")
    parser.add_argument("--cache", type=Path, default=corpus.default_cache())
    parser.add_argument("--timeout", type=int, default=900, help="seconds per job before it is killed")
    parser.add_argument("--latency-runs", type=int, default=10, help="timed runs per sample and model")
    parser.add_argument("--latency-samples", type=int, default=8, help="eval samples timed")
    parser.add_argument("--tables", type=Path, metavar="JSON", help="print the tables of an --out file; run nothing")
    parser.add_argument(
        "--update",
        type=Path,
        metavar="JSON",
        help="rerun the chosen jobs and replace their rows (same model and job) in this --out file, keeping the rest",
    )
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.job:
        return job_main(args)
    if args.tables:
        print(report(json.loads(args.tables.read_text())["rows"]))
        return 0
    keys = [k.strip() for k in args.passes.split(",") if k.strip()]
    unknown = [k for k in keys if k not in TOOLS]
    if unknown:
        print(f"unknown job(s) {', '.join(unknown)}; choose from {', '.join(TOOLS)}", file=sys.stderr)
        return 2
    models = [corpus.get(n) for n in args.names] if args.names else list(corpus.MODELS)
    # graphopt's modules byte-compiled first, as an installed package has them and as onnxslim's and onnxsim's
    # are: where PYTHONDONTWRITEBYTECODE is set, each job would otherwise compile graphopt's source again.
    for folder in ("graphopt", "passes"):
        compileall.compile_dir(ROOT / folder, quiet=1)
    kept = json.loads(args.update.read_text())["rows"] if args.update else []
    out = args.update or args.out
    rows: list[Row] = []
    for model in models:
        with tempfile.TemporaryDirectory(prefix="bench-corpus-") as tmp:  # outputs go once the model is done
            rows.extend(bench_model(model, keys, Path(tmp), args))
        if out:  # after every model, so a run stopped part-way keeps what it measured
            write_json(out, merge_rows(kept, rows))
    print(report(merge_rows(kept, rows)))
    return 0


def merge_rows(old: list[Row], new: list[Row]) -> list[Row]:
    """``old`` with each (model, job) row that ``new`` measured again replaced in place; new ones appended."""
    fresh = {(r["model"], r["key"]): r for r in new}
    merged = [fresh.pop((r["model"], r["key"]), r) for r in old]
    return merged + [r for r in new if (r["model"], r["key"]) in fresh]


def write_json(path: Path, rows: list[Row]) -> None:
    meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    os.replace(partial, path)


if __name__ == "__main__":
    sys.exit(main())
