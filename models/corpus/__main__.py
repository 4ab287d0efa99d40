"""Command line for the corpus.

python -m models.corpus list
python -m models.corpus fetch [NAMES...] [--cache DIR]
python -m models.corpus check [NAMES...] [--cache DIR]   # fp32 runs in ORT and score(ref, ref) == 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from models import corpus
from models.corpus.base import CorpusModel
from models.corpus.fetch import ArchiveError, FetchError, fetch, load_inputs


def _select(names: Sequence[str]) -> list[CorpusModel]:
    return [corpus.get(n) for n in names] if names else list(corpus.MODELS)


def _cell(text: object) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def cmd_list(_: argparse.Namespace) -> int:
    print("| name | package==version | task | metric | goal | fast | notes |")
    print("|---|---|---|---|---:|:---:|---|")
    for m in corpus.MODELS:
        cells = [m.name, m.requirement, m.task, m.metric, f"{m.goal:g}", "yes" if m.fast else "", m.notes]
        print("| " + " | ".join(_cell(c) for c in cells) + " |")
    print(f"\n{len(corpus.MODELS)} models, {len(corpus.fast_models())} fast")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    failed = 0
    for model in _select(args.names):
        try:
            path = fetch(model, args.cache, offline=corpus.offline())
        except (FetchError, ArchiveError) as exc:
            failed += 1
            print(f"{model.name}: FAILED {exc}")
            continue
        size = sum(f.stat().st_size for f in path.parent.rglob("*") if f.is_file() and not f.name.startswith("."))
        print(f"{model.name}: {path} ({size / 1e6:.1f} MB in its folder)")
    return 1 if failed else 0


def _shapes(feed_or_outputs: dict[str, np.ndarray] | list[np.ndarray]) -> str:
    items = feed_or_outputs.items() if isinstance(feed_or_outputs, dict) else enumerate(feed_or_outputs)
    return ", ".join(f"{k}: {a.dtype}{list(a.shape)}" for k, a in items)


def check_model(model: CorpusModel, cache: Path) -> str:
    """Fetch, make eval inputs, run fp32 in ONNX Runtime; raise unless score(ref, ref) is 1. Returns a summary."""
    import onnxruntime as ort

    path = fetch(model, cache, offline=corpus.offline())
    start = time.perf_counter()
    feeds = load_inputs(model, cache, "eval", offline=corpus.offline())
    make_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3  # ORT warns on every run of a model whose declared output shape is wrong
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs, times = [], []
    for feed in feeds:
        start = time.perf_counter()
        outputs.append(session.run(None, feed))
        times.append(time.perf_counter() - start)
    score = model.score(outputs, outputs)
    if score != 1.0:
        raise AssertionError(f"{model.name}: score(ref, ref) = {score!r}, expected 1.0")
    return (
        f"{model.name}: {len(feeds)} eval samples (ready in {make_s:.1f} s), fp32 median "
        f"{statistics.median(times) * 1e3:.1f} ms/sample (1 thread), {model.metric}(ref, ref) = 1.0\n"
        f"  in:  {_shapes(feeds[0])}\n"
        f"  out: {_shapes(outputs[0])}"
    )


def cmd_check(args: argparse.Namespace) -> int:
    failed = 0
    for model in _select(args.names):
        try:
            print(check_model(model, args.cache), flush=True)
        except Exception as exc:  # one broken entry must not hide the others' results
            failed += 1
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print(f"{model.name}: FAILED {type(exc).__name__}: {first}", flush=True)
    print(f"\n{failed} failed" if failed else "\nall ok")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.corpus", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="table of the corpus models").set_defaults(run=cmd_list)
    for name, run, text in (("fetch", cmd_fetch, "download and extract"), ("check", cmd_check, "fetch and run fp32")):
        command = sub.add_parser(name, help=text)
        command.add_argument("names", nargs="*", help="model names (default: all)")
        command.add_argument("--cache", type=Path, default=corpus.default_cache(), help="cache folder")
        command.set_defaults(run=run)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except KeyError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
