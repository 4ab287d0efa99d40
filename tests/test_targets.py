"""Targets: built-in recipes by name, data needs said up front, what the cpu target detected and chose."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import graphopt
from graphopt import catalog, cli, hardware, recipe, targets

DATA = Path(__file__).resolve().parents[1] / "graphopt" / "data"
DIGITS = str(DATA / "digits_cnn.onnx")
CALIB = str(DATA / "digits_calib.npz")


@pytest.mark.parametrize("name", list(targets.FILES))
def test_every_target_is_a_valid_recipe_that_says_what_it_is_for(name: str) -> None:
    plan = recipe.load_recipe(targets.path(name))
    assert plan.passes and len(targets.summary(name)) > 40


def test_recipes_lists_the_targets_in_80_columns_and_prints_one_to_copy(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["recipes"]) == 0
    text = capsys.readouterr().out
    assert all(f"\n{name}" in f"\n{text}" for name in targets.FILES) and "cpu (also: default)" in text
    assert max(len(line) for line in text.splitlines()) <= catalog.WIDTH
    assert cli.main(["recipes", "cpu-int8"]) == 0
    assert capsys.readouterr().out.strip() == targets.path("cpu-int8").read_text().strip()
    assert cli.main(["recipes", "tpu"]) == 2


def test_a_target_that_needs_data_says_so_before_anything_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["optimize", DIGITS, "-o", str(tmp_path), "--target", "cpu-int8"])
    text = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "pass 'quantize' (target cpu-int8) needs calibration data" in text and "--calib" in text
    assert not list(tmp_path.iterdir())


def test_the_cpu_target_without_data_warns_up_front(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        graphopt.optimize(DIGITS, "cpu")
    assert "no calibration data: quantize runs in dynamic mode" in caplog.text


def test_the_default_job_into_a_folder_names_its_target_and_what_it_chose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["optimize", DIGITS, "-o", str(tmp_path), "--calib", CALIB, "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "digits_cnn.cpu.onnx").is_file()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target"]["name"] == "cpu" and report["target"]["cpu"] == hardware.describe_cpu()
    weights = "7-bit weights" if hardware.u8s8_saturates() else "8-bit weights"
    assert any(c.startswith(weights) for c in report["target"]["choices"])
    assert "target cpu on" in capsys.readouterr().out


def test_recipe_settings_with_passes_from_the_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.yaml").write_text("passes: [fold, quantize]\nbudget: {max_abs: 0.0}\nverify: {samples: 4}\n")
    out = tmp_path / "o.onnx"
    code = cli.main(["optimize", DIGITS, "-o", str(out), "--recipe", str(tmp_path / "r.yaml"), "--pass", "fold"])
    text = " ".join(capsys.readouterr().out.split())
    assert code == 0 and "max abs error <= 0" in text and "quantize" not in text  # fold alone, the recipe's budget
    (tmp_path / "settings.yaml").write_text("verify: {samples: 4}\nbudget: {max_abs: 0.0}\n")  # settings only
    code = cli.main(["optimize", DIGITS, "-o", str(out), "--recipe", str(tmp_path / "settings.yaml"), "--pass", "fold"])
    assert code == 0 and "max abs error <= 0" in " ".join(capsys.readouterr().out.split())
    code = cli.main(["optimize", DIGITS, "-o", str(out), "--recipe", "cpu", "--target", "cpu"])
    assert code == 2 and "either --target or --recipe" in capsys.readouterr().err


def test_a_target_by_name_from_python() -> None:
    result = graphopt.optimize(DIGITS, "cpu-int4")
    assert result.report.target is not None and result.report.target["name"] == "cpu-int4"
    assert [p.name for p in result.report.passes] == ["fold", "weight_only", "fold"]


def test_o_naming_a_new_folder_creates_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new"
    code = cli.main(["optimize", DIGITS, "-o", f"{out}/", "--pass", "fold", "--no-verify"])
    assert code == 0, capsys.readouterr().err
    assert (out / "digits_cnn.opt.onnx").is_file()
