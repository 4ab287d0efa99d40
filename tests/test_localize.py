from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt import io
from graphopt.calibration.sources import DataSpec
from graphopt.localize import layer_errors, match_tensors
from graphopt.passes.fold.constants import FoldConstantsPass
from graphopt.passes.quantize import QuantizeConfig, QuantizeQDQPass
from graphopt.passes.quantize.calibrate import collect_ranges

DATA = Path(str(resources.files("graphopt") / "data"))


def test_quantized_tensors_are_compared_where_their_readers_see_them(tmp_path: Path) -> None:
    reference = io.load_model(DATA / "digits_cnn.onnx")
    FoldConstantsPass()(reference)
    candidate = reference.clone()
    data = DataSpec(source=str(DATA / "digits_calib.npz"), samples=32, batch_size=16)
    config = QuantizeConfig(method="minmax")
    QuantizeQDQPass(config, collect_ranges(candidate, data, config))(candidate)
    matched = match_tensors(reference, candidate)
    assert any(cand.endswith("_DequantizeLinear") for cand in matched.values())
    errors = layer_errors(reference, candidate, data)
    sqnr = [e.sqnr_db for e in errors]
    assert sqnr == sorted(sqnr) and all(np.isfinite(sqnr)) and 10 < sqnr[0] < 60
    assert {e.op_type for e in errors} >= {"Conv", "Gemm"}


def test_identical_models_have_infinite_sqnr() -> None:
    reference = io.load_model(DATA / "digits_cnn.onnx")
    errors = layer_errors(
        reference, reference.clone(), DataSpec(source=str(DATA / "digits_calib.npz"), samples=4), group_size=3
    )
    assert errors and all(math.isinf(e.sqnr_db) and e.max_abs == 0 for e in errors)


def test_models_without_value_info_are_compared_layer_by_layer(tmp_path: Path) -> None:
    """torch's TorchScript exporter writes no value_info: intermediate tensors are typed first, then compared."""
    import onnx

    proto = onnx.load(DATA / "digits_cnn.onnx")
    del proto.graph.value_info[:]
    onnx.save(proto, tmp_path / "untyped.onnx")
    reference = io.load_model(tmp_path / "untyped.onnx")
    assert any(out.dtype is None for node in reference.graph for out in node.outputs)
    candidate = reference.clone()
    data = DataSpec(source=str(DATA / "digits_calib.npz"), samples=16, batch_size=16)
    config = QuantizeConfig(method="minmax")
    QuantizeQDQPass(config, collect_ranges(candidate, data, config))(candidate)
    errors = layer_errors(reference, candidate, data)
    assert len(errors) >= 6 and {e.op_type for e in errors} >= {"Conv", "Relu"}


def test_an_overflowed_candidate_tensor_ranks_worst_without_crashing() -> None:
    """A float16 candidate that overflows where the reference is finite: infinite error, lowest SQNR."""
    from graphopt.localize import _row, _Sums

    sums = _Sums()
    sums.add(np.array([1.0, 2.0], np.float32), np.array([np.inf, 2.0], np.float32))
    node = ir.node("Relu", [ir.Value(name="x")])
    assert _row("y", node, sums).sqnr_db == -math.inf


def test_a_mask_of_minus_inf_in_both_models_is_no_error() -> None:
    """An attention mask's -inf is the same in both models: it must not rank as the worst layer (inf - inf is
    NaN), nor warn; a NaN or an infinity in one model only still ranks worst."""
    import warnings

    from graphopt.localize import _row, _Sums

    node = ir.node("Where", [ir.Value(name="x")])
    mask = np.array([0.0, -np.inf, -np.inf, 0.0], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = _Sums()
        same.add(mask, mask.copy())
        moved = _Sums()
        moved.add(np.array([1.0, -np.inf, 3.0], np.float32), np.array([1.5, -np.inf, 3.0], np.float32))
        broken = _Sums()
        broken.add(np.array([1.0, 2.0], np.float32), np.array([np.nan, 2.0], np.float32))
    assert same.diff_sq == 0 and same.ref_sq == 0  # dropped from the ranking: nothing to compare
    row = _row("m", node, moved)
    assert math.isfinite(row.sqnr_db) and row.max_abs == 0.5
    assert _row("b", node, broken).sqnr_db == -math.inf
