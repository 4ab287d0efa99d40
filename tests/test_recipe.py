from __future__ import annotations

import json
from pathlib import Path

import pytest

from graphopt import recipe
from graphopt.errors import RecipeError
from graphopt.passes.fold.constants import FoldConfig


def test_yaml_recipe_with_every_section(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(
        "passes:\n  - fold\n  - fold: {iterations: 2}\n  - {name: fold, options: {size_limit: 100}}\n"
        "calibration: {data: calib.npz, samples: 32}\n"
        "verify: {samples: 4, batch_size: 2, dims: {batch: 2}, report_only: true, latency_runs: 0}\n"
        "budget: {min_cosine: 0.99, outputs: [y]}\ndevice: cpu\ncheck: true\n"
    )
    plan = recipe.load_recipe(path)
    assert [s.config for s in plan.passes] == [FoldConfig(), FoldConfig(iterations=2), FoldConfig(size_limit=100)]
    assert plan.calibration is not None and plan.calibration.source == str(tmp_path / "calib.npz")
    assert plan.calibration.samples == 32
    assert plan.verify.data.dims == {"batch": 2} and plan.verify.report_only and plan.verify.latency_runs == 0
    assert plan.budget.min_cosine == 0.99 and plan.budget.outputs == ("y",)
    assert plan.check


def test_json_recipe(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"passes": [{"fold": {"iterations": 1}}], "budget": {"max_abs": 1}}))
    plan = recipe.load_recipe(path)
    assert plan.passes[0].config.iterations == 1
    assert plan.budget.max_abs == 1.0


def test_cli_pass_argument() -> None:
    step = recipe.parse_pass_arg("fold:iterations=2,inline_functions=false")
    assert step.config == FoldConfig(iterations=2, inline_functions=False)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "has no 'passes' list"),
        ({"passes": "fold"}, "must be a list of passes"),
        ({"passes": ["fold"], "pases": 1}, "unknown key(s) 'pases'; valid keys: passes, calibration, verify"),
        ({"passes": ["quantise"]}, "unknown pass 'quantise'; valid passes: fold"),
        ({"passes": [{"fold": {"iters": 2}}]}, "unknown key(s) 'iters'; valid keys: size_limit, iterations"),
        ({"passes": [{"fold": {"iterations": True}}]}, "iterations: expected int; got True (bool)"),
        ({"passes": [42]}, "expected a pass name or {name: {options}}"),
        ({"passes": ["fold"], "device": "tpu"}, "device 'tpu' is not one of cpu, cuda"),
        ({"passes": ["fold"], "budget": {"min_cosine": "high"}}, "min_cosine: expected float; got 'high'"),
        ({"passes": ["fold"], "verify": {"sample": 3}}, "unknown key(s) 'sample'"),
        ({"passes": ["fold"], "calibration": {"data": 3}}, "data: expected str; got 3 (int)"),
        ({"passes": ["fold"], "verify": {"dims": {"batch": "x"}}}, "dims.batch: expected int"),
        ({"passes": ["fold"], "check": "yes"}, "check: expected bool"),
    ],
)
def test_bad_recipes(data: dict[str, object], message: str) -> None:
    with pytest.raises(RecipeError) as info:
        recipe.parse_recipe(data)
    assert message in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        recipe.load_recipe(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [fold\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        recipe.load_recipe(bad)
    with pytest.raises(RecipeError, match="is not key=value"):
        recipe.parse_pass_arg("fold:iterations")


def test_a_colon_pair_is_text_not_a_base_60_number() -> None:
    """YAML 1.1 reads 2:4 as 124 (base 60); a user writing prune:pattern=2:4 meant the text."""

    assert recipe.parse_pass_arg("prune:pattern=2:4").config.m == 4  # text, read as n:m
    with pytest.raises(RecipeError, match="'1:2:3'"):
        recipe.parse_pass_arg("prune:pattern=1:2:3")
    assert recipe.parse_pass_arg("fold:iterations=3").config.iterations == 3  # plain integers are still integers
