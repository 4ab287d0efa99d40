from __future__ import annotations

from pathlib import Path

import pytest

from graphopt import cli


def test_demo_runs_default_recipe_on_bundled_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out.replace("\n", " ")
    assert "PASSED" in text and "digits test accuracy (540 images)" in text
    assert (tmp_path / "digits_cnn.opt.onnx").stat().st_size < 0.4 * 349_877
