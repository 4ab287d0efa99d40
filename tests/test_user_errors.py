"""Every user mistake of tests/harness/hostile_user_errors.py is a clean exit-2 error: one
`error:` line, no traceback, nothing written; and the inputs those checks must not refuse
still run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from graphopt import cli, io, runtime, verify
from graphopt.budget import Budget
from graphopt.calibration.sources import DataSpec
from graphopt.errors import DataError
from tests.harness.hostile_files import snapshot
from tests.harness.hostile_user_errors import CASES, Case, linear_model, scalar_input_model, unsorted_model


def _main(args: list[str]) -> int:
    try:
        return cli.main(args)
    except SystemExit as exc:  # argparse refuses a flag value this way
        return int(exc.code or 0)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_user_error_is_a_clean_error(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    args = case.make(tmp_path)
    before = snapshot(tmp_path)
    code = _main(args)
    captured = capsys.readouterr()
    assert code == 2, captured.out + captured.err
    assert "error:" in captured.err and "Traceback" not in captured.err
    assert snapshot(tmp_path) == before


def _optimize(model: Path, tmp_path: Path, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "out.onnx"
    return _main(["optimize", str(model), "-o", str(out), *extra]), out


def test_lone_npy_feeds_a_single_input_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "samples.npy", np.ones((4, 4), np.float32))
    code, out = _optimize(linear_model(tmp_path), tmp_path, "--verify-data", str(tmp_path / "samples.npy"))
    assert code == 0, capsys.readouterr().err
    assert out.is_file() and "4 samples" in capsys.readouterr().out


def test_zero_d_array_feeds_a_rank_0_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "d.npz", x=np.ones((3, 4), np.float32), s=np.array(2.0, np.float32))
    code, out = _optimize(scalar_input_model(tmp_path), tmp_path, "--verify-data", str(tmp_path / "d.npz"))
    assert code == 0, capsys.readouterr().err
    assert out.is_file()


def test_unsorted_nodes_are_put_in_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _optimize(unsorted_model(tmp_path), tmp_path)
    assert code == 0, capsys.readouterr().err
    assert out.is_file()


def test_onnx_runtime_refusing_inputs_is_a_data_error_naming_them(tmp_path: Path) -> None:
    session = runtime.create_session(linear_model(tmp_path))
    with pytest.raises(DataError, match=r"expects x tensor\(float\) \['batch', 4\]; it was given x float32 \[2, 5\]"):
        runtime.run(session, {"x": np.zeros((2, 5), np.float32)})
    with pytest.raises(DataError, match="given z float32"):
        runtime.measure_latency(session, {"z": np.zeros((2, 4), np.float32)}, warmup=0, runs=1)


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"min_cosine": 5.0}, "min_cosine must be between -1.0 and 1.0; got 5.0"),
        ({"max_abs": float("nan")}, "max_abs must be between 0.0 and inf; got nan"),
        ({"max_rel_l2": -0.5}, "max_rel_l2 must be between 0.0 and inf; got -0.5"),
        ({"min_top1": 1.5}, "min_top1 must be between 0.0 and 1.0; got 1.5"),
    ],
)
def test_budget_refuses_limits_no_model_can_meet(limits: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        Budget(**limits)


def _labelled(path: Path, labels: list[bytes], in_subgraph: bool = False) -> Path:
    """A classifier whose second output is its label looked up in a string table (top-level or in an If)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = helper.make_tensor("labels", TensorProto.STRING, [len(labels)], labels)
    label = helper.make_tensor_value_info("label", TensorProto.STRING, ["batch"])
    weight = _weights()
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y"]),
        helper.make_node("ArgMax", ["y"], ["i"], axis=1, keepdims=0),
    ]
    inits = [numpy_helper.from_array(weight, "W")]
    if in_subgraph:
        body = helper.make_graph(
            [helper.make_node("Gather", ["labels", "i"], ["l"], axis=0)], "then", [], [label], [table]
        )
        body.output[0].name = "l"
        inits.append(numpy_helper.from_array(np.array(True), "cond"))
        nodes.append(helper.make_node("If", ["cond"], ["label"], then_branch=body, else_branch=body))
    else:
        inits.append(table)
        nodes.append(helper.make_node("Gather", ["labels", "i"], ["label"], axis=0))
    graph = helper.make_graph(
        nodes,
        "labelled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", len(labels)]), label],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("in_subgraph", [False, True], ids=["top-level", "in-if"])
def test_string_tables_are_kept_and_string_outputs_compared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], in_subgraph: bool
) -> None:
    """A label table is not a reason to refuse a model: the passes leave it, inspect counts it, and verification
    judges a string output by equality (a changed label is a changed decision)."""
    model = _labelled(tmp_path / "m.onnx", [b"cat", b"dog", b"emu"], in_subgraph)
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((16, 4)).astype(np.float32))
    for passes in (["--pass", "fold"], ["--pass", "fp16"], []):
        code, out = _optimize(model, tmp_path, "--calib", str(data), *passes)
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert out.is_file()
    assert _main(["inspect", str(model)]) == 0
    assert "STRING" in capsys.readouterr().out
    other = _labelled(tmp_path / "other.onnx", [b"cat", b"dog", b"yak"], in_subgraph)
    assert _main(["verify", str(model), str(other), "--data", str(data)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "'label': decisions standing" in captured.out + captured.err
    result = verify.verify_models(
        io.load_model(model),
        io.load_model(other),
        DataSpec(source=str(data), samples=16),
        budget=Budget(min_decisions=0.98),
    )
    outputs = {o.name: o for o in result.outputs}
    assert outputs["y"].decisions is None and outputs["y"].max_abs == 0
    labels = np.array(["cat", "dog", "emu"])[np.argmax(np.load(data)["x"] @ _weights(), axis=1)]
    changed = np.mean(labels == "emu")  # the samples labelled "emu" changed
    label = outputs["label"]
    assert label.decisions == pytest.approx(1 - changed) and label.max_abs == 1.0
    # strings have no angle or class scores: only the share changed counts, as a relative L2
    assert label.rel_l2 == pytest.approx(np.sqrt(changed)) and label.cosine_min == 1.0 and label.top1 is None


def _weights() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)


def test_nan_means_missing_where_the_model_reads_it_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A tree ensemble (LightGBM, XGBoost exports) follows its missing-value branch on NaN, and its package feeds
    NaN on purpose: such an input takes NaN (still not Inf); an input of an MLP refuses it (the hostile cases)."""
    import onnx
    from onnx import TensorProto, helper

    tree = helper.make_node(
        "TreeEnsembleRegressor",
        ["features"],
        ["y"],
        domain="ai.onnx.ml",
        n_targets=1,
        nodes_treeids=[0, 0, 0],
        nodes_nodeids=[0, 1, 2],
        nodes_featureids=[0, 0, 0],
        nodes_values=[0.5, 0.0, 0.0],
        nodes_modes=["BRANCH_LT", "LEAF", "LEAF"],
        nodes_truenodeids=[1, 0, 0],
        nodes_falsenodeids=[2, 0, 0],
        nodes_missing_value_tracks_true=[1, 0, 0],
        target_treeids=[0, 0],
        target_nodeids=[1, 2],
        target_ids=[0, 0],
        target_weights=[1.0, 2.0],
    )
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["features"], to=TensorProto.FLOAT), tree],
        "trees",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 10
    path = tmp_path / "trees.onnx"
    onnx.save(model, path)
    x = np.random.default_rng(2).uniform(0, 1, (8, 2))
    x[::3, 0] = np.nan
    np.savez(tmp_path / "x.npz", x=x)
    code, out = _optimize(path, tmp_path, "--calib", str(tmp_path / "x.npz"), "--pass", "fold")
    captured = capsys.readouterr()
    assert code == 0 and out.is_file(), captured.err
    x[1, 1] = np.inf
    np.savez(tmp_path / "inf.npz", x=x)
    code, _ = _optimize(path, tmp_path, "--calib", str(tmp_path / "inf.npz"), "--pass", "fold")
    assert code == 2 and "input 'x', sample 1: the data holds Inf values" in capsys.readouterr().err
