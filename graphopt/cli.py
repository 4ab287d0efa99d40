"""The ``graphopt`` command line: optimize | inspect | verify | bench | passes | demo.

Exit codes: 0 ok, 1 accuracy budget exceeded, 2 user error (bad model, recipe, data or
device), 3 a pass failed, 130 interrupted. User errors print one clear message, no traceback.

This module only parses arguments; :mod:`graphopt.commands` does the work, imported once a
command is known, so ``--help`` answers without loading ONNX or ONNX Runtime.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from graphopt import __version__, registry
from graphopt.budget import BOUNDS
from graphopt.hardware import DEVICES


def _count(low: int) -> Callable[[str], int]:
    """An argparse type for a whole number >= ``low``: 0 runs or samples would measure nothing."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}; got {value}")
        return value

    return parse


def _limit(name: str) -> Callable[[str], float]:
    """An argparse type for a budget limit inside the range the metric can take."""
    low, high = BOUNDS[name]

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}; got {text}")
        return value

    return parse


EXAMPLES = """examples:
  graphopt optimize model.onnx -o out/ --calib calib.npz
      the default job (--target cpu): int8 where it pays on this CPU, verified
      and timed; writes out/model.cpu.onnx
  graphopt optimize model.onnx -o model.int4.onnx --target cpu-int4
      a built-in recipe; graphopt recipes lists them
  graphopt optimize model.onnx -o model.opt.onnx --pass fold
      exact clean-up only
  graphopt optimize model.onnx -o int4.onnx --pass weight_only:bits=4,block_size=64
  graphopt bench model.onnx model.int8.onnx
      both timed in alternation: medians and the ratio
  graphopt passes quantize
      one pass with every option

exit codes: 0 ok, 1 over the accuracy or latency budget, 2 user error, 3 a pass
failed, 130 interrupted
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphopt",
        description="ONNX graph-level compression compiler: a smaller, faster ONNX model, checked against its input.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"graphopt {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("optimize", help="run a recipe of passes over a model, verify and save it")
    p.add_argument("model")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output .onnx path (never the input); a folder: FOLDER/<stem>.<target>.onnx",
    )
    p.add_argument(
        "--recipe", help="recipe file (.yaml/.json) or a built-in recipe's name (graphopt recipes); default: cpu"
    )
    p.add_argument(
        "--target",
        metavar="NAME",
        help="a built-in recipe for a deployment (graphopt recipes): cpu (the default), cpu-int8, cpu-int4, "
        "gpu-fp16, gpu-int8, gpu-int4, size",
    )
    p.add_argument(
        "--pass", dest="passes", action="append", default=[], metavar="NAME[:k=v,...]", help="a pass (repeatable)"
    )
    p.add_argument(
        "--calib", help="calibration data: .npz, a folder of <input>.npy, or a folder of per-sample .npz (any shapes)"
    )
    p.add_argument(
        "--calib-script",
        metavar="FILE.py:FUNCTION",
        help="calibration data from your code: FUNCTION() returns feed dicts (a generator) or a CalibrationDataReader",
    )
    p.add_argument(
        "--verify-data", help="verification inputs: .npz or folder of .npy (default: random from input specs)"
    )
    p.add_argument("--samples", type=_count(1), help="verification samples")
    p.add_argument("--dim", action="append", default=[], metavar="NAME=N", help="value of a symbolic input dim")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument("--threads", type=_count(1), help="ONNX Runtime intra-op threads for verification and latency")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--report-md", help="write the Markdown report here")
    p.add_argument("--report-dir", help="write report.json, report.md and PNG plots into this folder")
    p.add_argument("--check", action="store_true", help="run onnx.checker after every pass")
    p.add_argument("--no-verify", action="store_true", help="skip verification against the input model")
    p.add_argument("--report-only", action="store_true", help="report budget violations without failing")
    p.add_argument(
        "--max-latency-ratio",
        type=_limit("max_latency_ratio"),
        metavar="R",
        help="latency budget: the output's median latency at most R times the input's (the default recipe: 1.0)",
    )
    p.add_argument("--external-data", action="store_true", help="save weights to <output>.data")
    p.add_argument(
        "--keep-debug-metadata",
        action="store_true",
        help="keep the exporter's per-node debug annotations (stack traces, FX text); dropped by default",
    )
    p.add_argument(
        "--sparse",
        choices=("auto", "always", "never"),
        default="auto",
        help="store pruned weights as sparse initializers: auto = when smaller (ORT densifies them at load)",
    )

    p = sub.add_parser("inspect", help="ops, parameters, bytes by dtype, sparsity, Q/DQ, opsets")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")

    for name, helptext in (
        ("verify", "compare a candidate with its reference"),
        ("bench", "latency of a model; of several: timed in alternation, with their ratios to the first"),
    ):
        p = sub.add_parser(name, help=helptext)
        if name == "verify":
            p.add_argument("reference")
            p.add_argument("candidate")
            limits = ("--max-abs", "--max-rel-l2", "--min-cosine", "--min-top1", "--min-decisions")
            for flag in (*limits, "--max-perplexity-increase", "--min-token-top1"):
                p.add_argument(
                    flag,
                    type=_limit(flag[2:].replace("-", "_")),
                    help="a limit of the budget (without any: the default recipe's budget)",
                )
        else:
            p.add_argument("models", nargs="+", metavar="MODEL", help="one model, or several to compare")
            p.add_argument("--runs", type=_count(1), default=50)
            p.add_argument("--warmup", type=_count(0), default=10)
        p.add_argument("--data", help="inputs: .npz or folder of .npy (default: random)")
        p.add_argument("--samples", type=_count(1))
        p.add_argument("--batch-size", type=_count(1), default=1)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--dim", action="append", default=[], metavar="NAME=N")
        p.add_argument("--device", choices=DEVICES, default="cpu")
        p.add_argument("--threads", type=_count(1))

    p = sub.add_parser("recipes", help="the built-in recipes (targets); NAME: print one to copy and edit")
    p.add_argument("names", nargs="*", metavar="NAME")
    p = sub.add_parser("passes", help="list every pass with its options; NAME: one pass in full")
    p.add_argument("names", nargs="*", metavar="NAME", help="passes to print in full")
    p = sub.add_parser("demo", help="optimize the bundled digits CNN with the default recipe")
    p.add_argument("--out", help="folder for the demo's output (default: a temporary folder)")
    return parser


def main(argv: Sequence[str] | None = None, *, known: registry.Registry = registry.REGISTRY) -> int:
    """Parse ``argv`` and run the command; ``known`` is the pass table ``--pass``/recipes name passes from."""
    args = build_parser().parse_args(argv)
    if args.command in ("passes", "recipes"):  # the catalogue loads no ONNX: it answers at once
        from graphopt import catalog
        from graphopt.errors import GraphoptError

        try:
            if args.command == "recipes":
                return catalog.print_recipes(args.names)
            return catalog.print_passes(args.names, known)
        except GraphoptError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return exc.exit_code
    return int(importlib.import_module("graphopt.commands").run(args, known))


if __name__ == "__main__":
    sys.exit(main())
