"""``python -m models [NAME ...] [--force] [--cache-dir DIR]``: export and summarise."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from models.zoo import ZOO_NAMES, export, info

SUMMARY_KEYS = (
    "test_accuracy",
    "max_abs_err_torch_vs_ort",
    "build_seconds",
    "export_seconds",
    "num_nodes",
    "file_bytes",
    "op_histogram",
    "inputs",
    "output_specs",
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models", description=__doc__)
    parser.add_argument("names", nargs="*", help=f"subset of {', '.join(ZOO_NAMES)}")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--cache-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in args.names or ZOO_NAMES:
        path = export(name, args.cache_dir, force=args.force)
        meta = info(name, args.cache_dir)
        summary = {k: meta[k] for k in SUMMARY_KEYS if k in meta}
        print(f"== {name}: {path}")
        print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
