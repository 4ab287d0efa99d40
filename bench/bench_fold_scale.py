"""fold on generated chains of 10k / 50k / 100k nodes: wall time and peak RSS, beside onnxslim, in fresh processes.

    python bench/bench_fold_scale.py [--nodes 10000 50000 100000]

Each chain alternates ``Add`` of a constant (itself ``Mul`` of two constants, which fold
removes) and ``Relu``, the shape of a deep exported network. Every tool runs file to file in
its own process, measured from outside (wall time; peak RSS of the child); the growth column
is the time ratio per 10× nodes, from the smallest chain.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TOOLS = {
    "graphopt fold": "from graphopt import cli; code = cli.main(['optimize', src, '-o', dst, '--pass', 'fold', "
    "'--no-verify'])",
    "onnxslim": "import onnxslim; onnxslim.slim(src, dst); code = 0",
}
# The child reports its own peak RSS (KiB on Linux) as its last stderr line. graphopt's crash-probe grandchild
# (an ORT load of the output at save) is not in it: the figure undercounts graphopt.
_CHILD = """
import resource, sys
src, dst = sys.argv[1], sys.argv[2]
{tool}
sys.stderr.write(f"\\nPEAK_RSS_KIB {{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}\\n")
sys.exit(code)
"""


def make_chain(path: Path, nodes: int) -> int:
    """A chain with ``nodes`` data nodes plus one foldable constant product per Add; returns the node count."""
    inits = [numpy_helper.from_array(np.full((1, 8), 0.5, np.float32), "a")]
    inits.append(numpy_helper.from_array(np.full((1, 8), 0.25, np.float32), "b"))
    graph_nodes, previous = [], "x"
    for i in range(nodes):
        if i % 2 == 0:
            graph_nodes.append(helper.make_node("Mul", ["a", "b"], [f"c{i}"]))
            graph_nodes.append(helper.make_node("Add", [previous, f"c{i}"], [f"v{i}"]))
        else:
            graph_nodes.append(helper.make_node("Relu", [previous], [f"v{i}"]))
        previous = f"v{i}"
    graph = helper.make_graph(
        graph_nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info(previous, TensorProto.FLOAT, ["N", 8])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return len(graph_nodes)


def run(tool: str, src: Path, dst: Path, timeout: float) -> tuple[float | None, float | None, str]:
    """(wall seconds, peak RSS MiB of the child; None on failure), and the error."""
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD.format(tool=TOOLS[tool]), str(src), str(dst)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, None, f"timeout after {timeout:g} s"
    seconds = time.perf_counter() - start
    lines = done.stderr.strip().splitlines()
    peak = int(lines[-1].split()[1]) / 1024 if lines and lines[-1].startswith("PEAK_RSS_KIB") else None
    if done.returncode != 0:
        return None, peak, (lines[-2] if len(lines) > 1 else "failed")[:120]
    return seconds, peak, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    print("| tool | chain nodes | wall s | peak RSS MiB | growth per 10× nodes | error |")
    print("|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory() as tmp:
        chains: dict[int, tuple[Path, int]] = {}
        for size in args.nodes:
            path = Path(tmp) / f"chain{size}.onnx"
            chains[size] = (path, make_chain(path, size))
        for tool in TOOLS:
            first: tuple[int, float] | None = None
            for size in args.nodes:
                src, count = chains[size]
                seconds, peak, error = run(tool, src, Path(tmp) / f"out-{size}.onnx", args.timeout)
                growth = ""
                if seconds is not None and first is not None:
                    growth = f"{(seconds / first[1]) ** (1 / math.log10(count / first[0])):.1f}×"
                elif seconds is not None:
                    first = (count, seconds)
                wall = f"{seconds:.1f}" if seconds is not None else "–"
                rss = f"{peak:.0f}" if peak is not None else "–"
                print(f"| {tool} | {count:,} | {wall} | {rss} | {growth} | {error} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
