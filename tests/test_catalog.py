"""``graphopt passes``: every pass and option, readable at 80 columns, answered without loading ONNX."""

from __future__ import annotations

import subprocess
import sys

import pytest

from graphopt import catalog, cli, registry


def test_the_list_fits_80_columns_and_names_every_pass_and_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["passes"]) == 0
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= catalog.WIDTH
    for name, spec in registry.REGISTRY.items():
        assert f"{name} (" in text
        words = text.replace("\n  ", " ")
        assert all(option in words for option, *_ in spec.options())


def test_calibration_data_is_stated_per_option() -> None:
    """weight_only reads data only for GPTQ, prune only for Wanda/SparseGPT; fold never."""
    assert "method=gptq" in " ".join(catalog.details("weight_only"))
    assert "method=wanda or method=sparsegpt" in " ".join(catalog.details("prune"))
    assert "calibration data: never read" in "\n".join(catalog.details("fold"))


def test_one_pass_in_full_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["passes", "quantize"]) == 0
    text = capsys.readouterr().out
    assert "reduce_range: bool | Literal['auto'] = 'auto'" in text
    assert "--pass quantize:mode=auto" in text and "exclude_op_types=[" in text
    assert max(len(line) for line in text.splitlines()) <= catalog.WIDTH


def test_an_unknown_pass_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["passes", "qauntize"]) == 2
    assert "unknown pass 'qauntize'; the passes are: fold" in capsys.readouterr().err


def test_listing_passes_loads_neither_onnx_nor_onnx_runtime() -> None:
    code = (
        "import sys; from graphopt import cli; cli.main(['passes', 'fold', 'weight_only']); "
        "heavy = [m for m in ('onnx', 'onnx_ir', 'onnxruntime', 'onnxscript', 'numpy') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
