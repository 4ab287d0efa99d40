"""Run every benchmark in bench/ one after the other and print their tables.

python bench/run_all.py [--only fold,quantize,...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = {
    "fold": ["bench_fold.py"],
    "peer_suite": ["peer_suite.py"],
    "quantize": ["bench_quantize.py"],
    "guardrails": ["bench_guardrails.py"],
    "lora": ["bench_lora.py"],
    "weight_only": ["bench_weight_only.py"],
    "prune": ["bench_prune.py"],
    "hostile": ["hostile_files.py"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHES)}")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHES)
    failed = []
    for name in names:
        script, *extra = BENCHES[name]
        present = (HERE / script).exists()
        if not present:
            continue
        print(f"\n## {name} ({script})\n", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / script), *extra], cwd=HERE.parent)
        print(f"\n({name}: {time.perf_counter() - start:.0f} s, exit {code})", flush=True)
        if code != 0:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
