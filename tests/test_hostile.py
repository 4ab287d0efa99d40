"""Every hostile input of bench/hostile_files.py is a clean exit-2 error that reads
nothing outside the case folder (besides Python's own files) and writes nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from graphopt import cli
from tests.harness.hostile_files import CASES, Case, snapshot

_OPENED: list[str] = []
_RECORDING: list[bool] = [False]


def _audit(event: str, args: tuple[object, ...]) -> None:
    if _RECORDING[0] and event == "open" and isinstance(args[0], (str, bytes)):
        _OPENED.append(args[0] if isinstance(args[0], str) else args[0].decode(errors="replace"))


sys.addaudithook(_audit)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input_is_a_clean_error(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    args = case.make(tmp_path)
    before = snapshot(tmp_path)
    _OPENED.clear()
    _RECORDING[0] = True
    try:
        code = cli.main(args)
    finally:
        _RECORDING[0] = False
    assert code == 2, capsys.readouterr()
    assert "error:" in capsys.readouterr().err
    assert snapshot(tmp_path) == before
    secret = str(tmp_path / "secret.data")
    assert secret not in _OPENED, f"read {secret} outside the model folder"
