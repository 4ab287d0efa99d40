"""Start-up time of the commands a user runs first: ``graphopt --help`` and ``graphopt passes``.

Each command runs in a fresh process ``--runs`` times; the median wall time is printed as a
Markdown table. Run it on two checkouts to compare them (same machine, one after the other).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = (["--help"], ["passes"], ["passes", "quantize"], ["--version"])


def wall(argv: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--graphopt", default=shutil.which("graphopt") or str(Path(sys.executable).parent / "graphopt"))
    args = parser.parse_args(argv)
    print(f"| command | median wall s (of {args.runs}) |")
    print("|---|---:|")
    for command in COMMANDS:
        print(f"| `graphopt {' '.join(command)}` | {wall([args.graphopt, *command], args.runs):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
