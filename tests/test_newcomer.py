"""The README's first commands, run as written: what a new user types after `make demo`."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The lines of the README's first ```sh block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```sh\n(.*?)```", text, re.S)
    assert block is not None, "README.md has no ```sh block of commands"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_commands_run_as_written(tmp_path: Path) -> None:
    """Each line exits 0 in a folder laid out like the repository (its graphopt/data), writing into out/."""
    (tmp_path / "graphopt").mkdir()
    (tmp_path / "graphopt" / "data").symlink_to(ROOT / "graphopt" / "data")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "120"}
    commands = readme_commands()
    assert any(c.startswith("graphopt optimize") for c in commands)
    for line in commands:
        done = subprocess.run(shlex.split(line), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert (tmp_path / "out" / "digits_cnn.cpu.onnx").is_file() and (tmp_path / "out" / "cpu.json").is_file()
