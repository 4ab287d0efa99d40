"""`python bench/hostile_files.py`: the harness lives in tests/harness/hostile_files.py (the tests run it too)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the repo root is importable

from tests.harness.hostile_files import main

if __name__ == "__main__":
    sys.exit(main())
