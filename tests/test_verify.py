from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphopt import budget, io, verify
from graphopt.calibration import sources
from graphopt.calibration.sources import DEFAULT_DIM, DataSpec, input_specs, iter_batches
from graphopt.errors import DataError
from tests import toy


def _acc(ref: np.ndarray, cand: np.ndarray) -> verify.OutputMetrics:
    acc = verify._Accumulator("y")
    for start in range(0, len(ref), 3):  # several batches: the reduction must stream
        acc.add(ref[start : start + 3], cand[start : start + 3])
    return acc.result()


def test_metrics_of_identical_outputs() -> None:
    ref = np.random.default_rng(0).standard_normal((10, 5)).astype(np.float32)
    metrics = _acc(ref, ref.copy())
    assert metrics.max_abs == 0 and metrics.rel_l2 == 0 and metrics.top1 == 1.0
    assert metrics.cosine_min == pytest.approx(1.0)


def test_metrics_of_perturbed_outputs() -> None:
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((10, 5))
    cand = ref.copy()
    cand[0, 0] += 0.5
    cand[3] = -cand[3]  # one sample flipped: cosine -1, top-1 differs
    metrics = _acc(ref, cand)
    assert metrics.max_abs == pytest.approx(max(0.5, 2 * np.abs(ref[3]).max()))
    assert metrics.cosine_min == pytest.approx(-1.0)
    assert metrics.top1 == pytest.approx(0.9)
    expected_rel = np.linalg.norm(ref - cand) / np.linalg.norm(ref)
    assert metrics.rel_l2 == pytest.approx(expected_rel)


def test_budget_violations_name_output_and_metric() -> None:
    metrics = verify.OutputMetrics("logits", max_abs=0.2, rel_l2=0.01, cosine_min=0.98, top1=0.9)
    found = budget.violations(metrics, verify.Budget(max_abs=0.1, min_cosine=0.99, min_top1=0.95, max_rel_l2=0.1))
    assert found == [
        "output 'logits': max abs error 0.2 > budget 0.1",
        "output 'logits': min cosine 0.980000 < budget 0.99",
        "output 'logits': top-1 agreement 0.9000 < budget 0.95",
    ]
    assert budget.violations(metrics, verify.Budget(max_abs=0.1, outputs=("other",))) == []


def test_nan_output_fails_any_abs_budget() -> None:
    ref = np.ones((2, 3))
    cand = ref.copy()
    cand[0, 0] = np.nan
    assert budget.violations(_acc(ref, cand), verify.Budget(max_abs=1.0))


def test_random_inputs_respect_tables_and_masks(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("Mul", ["e", "attention_mask"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["batch", "seq", 1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 3])],
        [numpy_helper.from_array(np.ones((7, 3), np.float32), "table")],
    )
    model = io.load_model(toy.save(toy._model(graph), tmp_path / "g.onnx"))
    specs = input_specs(model)
    assert specs[0].index_bound == 7
    batches = list(iter_batches(DataSpec(samples=5, batch_size=2, dims={"seq": 4}), specs))
    assert [b["ids"].shape for b in batches] == [(2, 4), (2, 4), (1, 4)]
    assert all(b["ids"].max() < 7 for b in batches)


def test_symbolic_dims_without_a_value_get_a_stated_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Generated inputs: the leading dim is the batch, other dims without --dim get DEFAULT_DIM, said once."""
    monkeypatch.setattr(sources, "_WARNED", set())  # once per process: other tests may have said it already
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", None])],
    )
    specs = input_specs(io.load_model(toy.save(toy._model(graph), tmp_path / "g.onnx")))
    with caplog.at_level(logging.WARNING):
        batches = list(iter_batches(DataSpec(samples=3, batch_size=2), specs))
        list(iter_batches(DataSpec(samples=3, batch_size=2), specs))
    assert [b["x"].shape for b in batches] == [(2, DEFAULT_DIM, DEFAULT_DIM), (1, DEFAULT_DIM, DEFAULT_DIM)]
    assert caplog.text.count("--dim seq=N") == 1 and caplog.text.count("--dim x:2=N") == 1
    shaped = list(iter_batches(DataSpec(samples=1, dims={"seq": 5, "x:2": 3}), specs))
    assert shaped[0]["x"].shape == (1, 5, 3)


def test_float64_data_for_a_float32_input_is_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "_WARNED", set())
    model = io.load_model(toy.save(toy.foldable(), tmp_path / "m.onnx"))
    data = DataSpec(source={"x": np.ones((4, 8), np.float64)}, samples=4, batch_size=2)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert all(b["x"].dtype == np.float32 for b in iter_batches(data, input_specs(model)))
    assert caplog.text.count("is float64 and the model takes float32") == 1
    integers = DataSpec(source={"x": np.ones((4, 8), np.int64)}, samples=4, batch_size=2)
    with caplog.at_level(logging.WARNING):
        assert all(b["x"].dtype == np.float32 for b in iter_batches(integers, input_specs(model)))
    assert "is int64 and the model takes float32: whole numbers are fed as they are" in caplog.text


def test_npz_and_npy_folder_sources(tmp_path: Path) -> None:
    model = io.load_model(toy.save(toy.foldable(), tmp_path / "m.onnx"))
    x = np.arange(24, dtype=np.float64).reshape(3, 8)
    np.savez(tmp_path / "d.npz", x=x)
    (tmp_path / "folder").mkdir()
    np.save(tmp_path / "folder" / "x.npy", x)
    for source in (str(tmp_path / "d.npz"), str(tmp_path / "folder"), {"x": x}):  # a dict holds what an .npz does
        batches = list(iter_batches(DataSpec(source=source, samples=10, batch_size=2), input_specs(model)))
        assert [b["x"].shape for b in batches] == [(2, 8), (1, 8)]
        assert batches[0]["x"].dtype == np.float32
    np.savez(tmp_path / "wrong.npz", z=x)
    with pytest.raises(DataError, match=r"no array for input\(s\) \['x'\]"):
        list(iter_batches(DataSpec(source=str(tmp_path / "wrong.npz")), input_specs(model)))
    with pytest.raises(DataError, match="no such file"):
        list(iter_batches(DataSpec(source=str(tmp_path / "none.npz")), input_specs(model)))


def test_an_infinity_both_models_give_agrees() -> None:
    """A -inf mask passed through to an output is the same in both models; an infinity in one only is an error."""
    ref = np.array([[0.5, -np.inf, 1.0], [2.0, 3.0, -np.inf]])
    metrics = _acc(ref, ref.copy())
    assert metrics.max_abs == 0 and metrics.rel_l2 == 0 and metrics.cosine_min == pytest.approx(1.0)
    assert not budget.violations(metrics, verify.Budget(max_abs=0.0, min_cosine=0.999))
    cand = ref.copy()
    cand[0, 0] = np.inf
    assert budget.violations(_acc(ref, cand), verify.Budget(max_abs=1.0))
    # arg-maxes still read the real values: a masked -inf class is the smallest, not a 0 that wins over log-probs
    logp = np.array([[np.log(0.7), np.log(0.3), -np.inf], [np.log(0.2), np.log(0.8), -np.inf]])  # class 2 masked
    flipped = logp[:, [1, 0, 2]]
    assert _acc(logp, flipped).top1 == 0.0


def test_an_output_that_changes_shape_misses_any_budget() -> None:
    """A TTS model whose quantized durations lengthen its audio: no value compares, so the output fails the
    budget (and the fallback scores it worst) instead of stopping the run as a data error."""
    acc = verify._Accumulator("audio")
    acc.add(np.ones((1, 8)), np.ones((1, 8)))
    acc.add(np.ones((1, 8)), np.ones((1, 10)))
    metrics = acc.result()
    assert metrics.reshaped == (1, 2, (1, 8), (1, 10), 0.25)
    found = budget.violations(metrics, verify.Budget())
    assert found == ["output 'audio': shape (1, 10) instead of (1, 8) on 1 of 2 feeds"]
    assert budget.violations(metrics, verify.Budget(outputs=("other",))) == []
    # over any budget, and nearer shapes score lower: the fallback can rank layers by how they move the shape
    far = budget.score([metrics], verify.Budget(min_cosine=0.5))
    nearer = verify._Accumulator("audio")
    nearer.add(np.ones((1, 8)), np.ones((1, 9)))
    nearer.add(np.ones((1, 8)), np.ones((1, 8)))
    assert far == budget.RESHAPED + 0.5 + 0.25
    assert budget.RESHAPED < budget.score([nearer.result()], verify.Budget(min_cosine=0.5)) < far


def test_a_reference_that_does_not_reproduce_itself_is_refused(tmp_path: Path) -> None:
    """Random ops make the input's own second run differ: no candidate can be judged against it."""
    graph = helper.make_graph(
        [helper.make_node("RandomNormalLike", ["x"], ["n"]), helper.make_node("Add", ["x", "n"], ["y"])],
        "noisy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = io.load_model(toy.save(toy._model(graph), tmp_path / "noisy.onnx"))
    checker = verify.Checker(model, DataSpec(samples=2), verify.Budget(min_cosine=0.99), "cpu", None)
    with pytest.raises(DataError, match=r"does not reproduce its own outputs.*RandomNormalLike.*--no-verify"):
        checker.check(model.clone(), probe=True)
    steady = io.load_model(toy.save(toy.foldable(), tmp_path / "m.onnx"))
    checker = verify.Checker(steady, DataSpec(samples=2), verify.Budget(max_abs=0), "cpu", None)
    assert checker.check(steady.clone(), probe=True)[1].passed


def test_verify_models_end_to_end(tmp_path: Path) -> None:
    model = io.load_model(toy.save(toy.foldable(), tmp_path / "m.onnx"))
    result = verify.verify_models(
        model, model.clone(), DataSpec(samples=6, batch_size=3), budget=verify.Budget(max_abs=0)
    )
    assert result.passed and result.samples == 6
    other = io.load_model(toy.save(toy.foldable(seed=1), tmp_path / "n.onnx"))
    result = verify.verify_models(model, other, DataSpec(samples=2), budget=verify.Budget(max_rel_l2=0.01))
    assert not result.passed and "relative L2" in result.violations[0]


def test_an_npz_is_read_only_up_to_the_samples_used(tmp_path: Path) -> None:
    """A compressed .npz of 100 MB (a few hundred KB on disk) gives its first samples without unpacking the rest."""
    import tracemalloc

    from graphopt.calibration.sources import load_arrays

    rows = np.zeros((25_000, 1_000), np.float32)
    rows[:3] = np.arange(3, dtype=np.float32)[:, None]
    np.savez_compressed(tmp_path / "big.npz", x=rows, f=np.asfortranarray(rows[:8]))
    tracemalloc.start()
    arrays = load_arrays(tmp_path / "big.npz", samples=4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert arrays["x"].shape == (4, 1_000) and arrays["x"][2, 0] == 2.0 and arrays["f"].shape == (4, 1_000)
    np.testing.assert_array_equal(arrays["f"], rows[:4])  # Fortran order: read whole, then cut
    assert peak < 10 * 2**20  # the 100 MB member was never unpacked
    assert load_arrays(tmp_path / "big.npz")["x"].shape == (25_000, 1_000)  # no sample count: all of it


def _lm(vocab: int = 50, width: int = 16, seed: int = 0, noise: float = 0.0) -> onnx.ModelProto:
    """A bigram language model: input_ids -> embedding Gather -> MatMul -> logits [batch, sequence, vocab]."""
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, width)).astype(np.float32)
    head = rng.standard_normal((width, vocab)).astype(np.float32)
    head += noise * np.random.default_rng(seed + 1).standard_normal(head.shape).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["h"]),
            helper.make_node("MatMul", ["h", "head"], ["logits"]),
        ],
        "lm",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(head, "head")],
    )
    return toy._model(graph)


def _perplexity(model: onnx.ModelProto, ids: np.ndarray, mask: np.ndarray) -> float:
    """Reference arithmetic: the model's logits in numpy, log-softmax, next tokens where both are unmasked."""
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    logits = (weights["table"][ids] @ weights["head"]).astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    scored = (mask[:, :-1] != 0) & (mask[:, 1:] != 0)
    nll = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    return float(np.exp(nll[scored].mean()))


def test_language_model_logits_get_perplexity_and_next_token_agreement(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50, (6, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # right padding: those positions are neither scored nor counted
    data = tmp_path / "tokens.npz"
    np.savez(data, input_ids=ids, attention_mask=mask)
    reference, candidate = _lm(), _lm(noise=0.3)
    paths = [toy.save(m, tmp_path / f"{name}.onnx") for name, m in (("ref", reference), ("cand", candidate))]
    spec = DataSpec(source=str(data), samples=6, batch_size=4)
    same = verify.verify_models(io.load_model(paths[0]), io.load_model(paths[0]), spec)
    [logits] = same.outputs
    assert logits.tokens == 6 * 11 - 3 and logits.token_top1 == 1.0 and logits.perplexity_increase == 0.0
    result = verify.verify_models(
        io.load_model(paths[0]), io.load_model(paths[1]), spec, budget=budget.Budget(max_perplexity_increase=0.01)
    )
    [logits] = result.outputs
    assert logits.reference_perplexity == pytest.approx(_perplexity(reference, ids, mask), rel=1e-5)
    assert logits.perplexity == pytest.approx(_perplexity(candidate, ids, mask), rel=1e-5)
    assert logits.perplexity_increase > 0.01 and 0 < logits.token_top1 < 1
    assert result.violations == [
        f"output 'logits': perplexity increase {logits.perplexity_increase:+.2%} > budget +1.00%"
    ]
    # With a token limit, a language model is judged by its next tokens alone: cosine limits stop applying.
    lenient = verify.verify_models(
        io.load_model(paths[0]),
        io.load_model(paths[1]),
        spec,
        budget=budget.Budget(min_cosine=0.9999, max_abs=1e-6, max_perplexity_increase=0.5),
    )
    assert lenient.passed and lenient.budget.startswith("perplexity increase <= +50.00% (a language model")
    # A budget scoped to outputs without logits keeps its own limits.
    scoped = budget.Budget(min_cosine=0.9999, max_perplexity_increase=0.5, outputs=("other",))
    assert budget.for_outputs(lenient.outputs, scoped) is scoped
    strict = verify.verify_models(io.load_model(paths[0]), io.load_model(paths[1]), spec, budget=budget.Budget(
        min_cosine=0.9999))  # fmt: skip
    assert not strict.passed  # without a token limit, the per-output limits judge as always
    line = budget.token_summary(logits)
    assert line is not None and "next-token top-1 agreement" in line and f"on {6 * 11 - 3} next tokens" in line
    assert result.to_dict()["outputs"][0]["perplexity_increase"] == logits.perplexity_increase  # type: ignore[index]
    # Not logits, or not scoring these ids: no token metrics, no keys in the report.
    hidden = verify._Accumulator("hidden")
    hidden.add(np.zeros((6, 12, 50), np.float32), np.zeros((6, 12, 50), np.float32), ids)
    assert hidden.result().tokens is None and "tokens" not in verify._output_dict(hidden.result())
    small = verify._Accumulator("logits")
    small.add(np.zeros((6, 12, 8), np.float32), np.zeros((6, 12, 8), np.float32), ids)  # ids reach 49 > 8
    assert small.result().tokens is None


def test_perplexity_on_random_token_ids_is_said_to_mean_little(tmp_path: Path) -> None:
    import graphopt
    from graphopt.report import outcome_warnings

    path = toy.save(_lm(width=32), tmp_path / "lm.onnx")
    result = graphopt.optimize(path, ["weight_only:block_size=16"])
    [logits] = result.report.verification.outputs  # type: ignore[union-attr]
    assert logits.tokens and logits.perplexity_increase is not None
    assert any("measured on random token ids" in w for w in outcome_warnings(result.report))
    data = tmp_path / "tokens.npz"
    ids = np.random.default_rng(0).integers(0, 50, (8, 10)).astype(np.int64)
    np.savez(data, input_ids=ids, attention_mask=np.ones_like(ids))
    given = graphopt.optimize(path, ["weight_only:block_size=16"], calibration=DataSpec(source=str(data)))
    # Judged by perplexity (a token limit in the budget) over random ids: a user error naming the fix, not a
    # verdict (nor a fallback chasing it).
    judged = {"passes": [{"weight_only": {"block_size": 16}}], "budget": {"max_perplexity_increase": 0.1}}
    with pytest.raises(DataError, match=r"judged by its perplexity on token windows.*--verify-data DIR"):
        graphopt.optimize(path, judged)
    assert graphopt.optimize(path, judged, calibration=DataSpec(source=str(data))).report.verification is not None
    assert not any("random token ids" in w for w in outcome_warnings(given.report))


def _cached_lm(vocab: int = 50, width: int = 32) -> onnx.ModelProto:
    """A decoder with a KV cache as GenAI exports name it: present.0 = past_key_values.0 ++ this step's embeddings."""
    rng = np.random.default_rng(4)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "input_ids"], ["h"]),
            helper.make_node("MatMul", ["h", "head"], ["logits"]),
            helper.make_node("Concat", ["past_key_values.0", "h"], ["present.0"], axis=1),
        ],
        "cached_lm",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
            helper.make_tensor_value_info("past_key_values.0", TensorProto.FLOAT, ["batch", "past", width]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab]),
            helper.make_tensor_value_info("present.0", TensorProto.FLOAT, ["batch", "total", width]),
        ],
        [
            numpy_helper.from_array(rng.standard_normal((vocab, width)).astype(np.float32), "table"),
            numpy_helper.from_array(rng.standard_normal((width, vocab)).astype(np.float32), "head"),
        ],
    )
    return toy._model(graph)


def test_a_decoder_with_a_kv_cache_gets_its_decode_step_timed(tmp_path: Path) -> None:
    import graphopt
    from graphopt import runtime

    ids = np.random.default_rng(5).integers(0, 50, (4, 6)).astype(np.int64)
    data = tmp_path / "tokens.npz"
    np.savez(data, input_ids=ids, attention_mask=np.ones_like(ids), **{"past_key_values.0": np.zeros((4, 0, 32))})
    path = toy.save(_cached_lm(), tmp_path / "lm.onnx")
    session = runtime.create_session(io.load_model(path))
    prompt = {"input_ids": ids, "attention_mask": np.ones_like(ids), "past_key_values.0": np.zeros((4, 0, 32), "f4")}
    feeds = verify.decode_feeds(session, prompt)
    assert feeds is not None and feeds["input_ids"].shape == (4, 1) and feeds["attention_mask"].shape == (4, 7)
    assert feeds["past_key_values.0"].shape == (4, 6, 32)
    assert verify.decode_feeds(session, {**prompt, "past_key_values.0": feeds["past_key_values.0"]}) is None
    result = graphopt.optimize(path, ["weight_only:block_size=16"], calibration=DataSpec(source=str(data)))
    decode = result.report.decode_latency
    assert decode is not None and decode["optimized"].runs > 0
    assert result.report.to_dict()["decode_latency"] is not None
    assert "Decode step" in result.report.to_markdown()
    import io as text_io

    from rich.console import Console

    from graphopt import render

    shown = text_io.StringIO()
    render.render_report(Console(file=shown, width=200), result.report)
    assert "Decode step (1 token after the verification prompt's KV cache" in shown.getvalue()
    no_cache = graphopt.optimize(toy.save(_lm(width=32), tmp_path / "plain.onnx"), ["weight_only:block_size=16"])
    assert no_cache.report.decode_latency is None


def test_the_latency_budget_judges_a_decoders_decode_step_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ratio a latency budget reads is one generation's: the prompt, then a decode step per prompt token."""
    from graphopt import runtime

    ids = np.random.default_rng(6).integers(0, 50, (4, 6)).astype(np.int64)
    data = tmp_path / "tokens.npz"
    np.savez(data, input_ids=ids, attention_mask=np.ones_like(ids), **{"past_key_values.0": np.zeros((4, 0, 32))})
    model = io.load_model(toy.save(_cached_lm(), tmp_path / "lm.onnx"))
    checker = verify.Checker(model, DataSpec(source=str(data)), budget.Budget(), "cpu", 1)
    timed_feeds = []

    def fake(reference: object, candidate: object, feeds: dict[str, np.ndarray], **_: object) -> dict:
        timed_feeds.append(feeds["input_ids"].shape[1])
        prompt = feeds["input_ids"].shape[1] > 1
        return {
            "reference": runtime.Latency(2.0 if prompt else 1.0, 0, 0, 1),
            "optimized": runtime.Latency(1.0 if prompt else 1.5, 0, 0, 1),  # prompt 0.5x, decode step 1.5x
        }

    def fake_of(sessions: dict[str, object], feeds: dict[str, np.ndarray], **_: object) -> dict:
        pair = fake(None, None, feeds)
        return {name: pair["reference" if name == "reference" else "optimized"] for name in sessions}

    monkeypatch.setattr(runtime, "sized_latency", fake)
    monkeypatch.setattr(runtime, "sized_latency_of", fake_of)
    # 6 prompt tokens: (1.0 + 6 * 1.5) / (2.0 + 6 * 1.0); the prompt alone would say 0.5, the worse of the two 1.5
    assert checker.latency_ratio(model) == pytest.approx(10 / 8)
    assert timed_feeds == [6, 1]  # the prompt, then one token after its cache
    steps = checker.timed_decode(model, runs=5)  # the budget's timing of this model is the report's
    assert steps is not None and steps["optimized"].median_ms == 1.5 and timed_feeds == [6, 1]
    plain = io.load_model(toy.save(_lm(width=32), tmp_path / "plain.onnx"))
    tokens = tmp_path / "plain.npz"
    np.savez(tokens, input_ids=ids, attention_mask=np.ones_like(ids))
    no_cache = verify.Checker(plain, DataSpec(source=str(tokens)), budget.Budget(), "cpu", 1)
    assert no_cache.latency_ratio(plain) == pytest.approx(0.5)  # no decode step: the prompt alone


def _decider() -> onnx.ModelProto:
    """Scores of 5 classes per position out of a Softmax moved to the last axis; ids out of an ArgMax; raw logits."""
    rng = np.random.default_rng(8)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["z"]),
            helper.make_node("Transpose", ["z"], ["zt"], perm=[0, 2, 1]),
            helper.make_node("Softmax", ["zt"], ["p"], axis=1),
            helper.make_node("Transpose", ["p"], ["probs"], perm=[0, 2, 1]),
            helper.make_node("ArgMax", ["z"], ["ids"], axis=-1, keepdims=0),
            helper.make_node("Identity", ["z"], ["logits"]),
        ],
        "decider",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "time", 4])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", "time", 5]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "time"]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "time", 5]),
        ],
        [numpy_helper.from_array(rng.standard_normal((4, 5)).astype(np.float32), "W")],
    )
    return toy._model(graph)


def test_decision_outputs_are_found_through_data_movement(tmp_path: Path) -> None:
    model = io.load_model(toy.save(_decider(), tmp_path / "d.onnx"))
    # the Softmax's classes (its axis 1, size 5) are the output's last axis after the Transpose; raw logits named so
    # straight out of the MatMul are decisions too
    assert verify.decision_outputs(model) == {"probs": "scores", "ids": "ids", "logits": "scores"}


@pytest.mark.parametrize(
    ("name", "classes", "reshaped", "is_decision"),
    [
        ("logits", 26, False, True),  # a classifier's Gemm head
        ("embedding", 26, False, False),  # an embedding's arg-max means nothing
        ("logits", 49152, False, False),  # a language model's vocabulary: perplexity judges it
        ("logits", 26, True, False),  # flattened: no longer classes per position
    ],
)
def test_raw_logits_are_decisions_only_as_a_linear_heads_named_output(
    tmp_path: Path, name: str, classes: int, reshaped: bool, is_decision: bool
) -> None:
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["z" if reshaped else name], transB=1)]
    if reshaped:
        nodes.append(helper.make_node("Reshape", ["z", "flat"], [name]))
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, None] if reshaped else ["batch", classes])],
        [
            numpy_helper.from_array(np.zeros((classes, 8), np.float32), "W"),
            numpy_helper.from_array(np.zeros(classes, np.float32), "b"),
            numpy_helper.from_array(np.array([1, -1], np.int64), "flat"),
        ],
    )
    model = io.load_model(toy.save(toy._model(graph), tmp_path / "head.onnx"))
    assert (verify.decision_outputs(model) == {name: "scores"}) is is_decision


def test_a_sample_stands_when_99_percent_of_its_positions_keep_their_class() -> None:
    rng = np.random.default_rng(9)
    short = rng.standard_normal((4, 10, 5)).astype(np.float32)
    flipped = short.copy()
    flipped[1, 3] = -flipped[1, 3]  # one position of sample 1 changes its arg-max
    acc = verify._Accumulator("probs", kind="scores")
    acc.add(short, flipped)
    assert acc.result().decisions == 0.75  # 10 positions: one flip is 90% kept
    long = rng.standard_normal((2, 200, 5)).astype(np.float32)
    flipped = long.copy()
    flipped[0, 7] = -flipped[0, 7]
    acc = verify._Accumulator("probs", kind="scores")
    acc.add(long, flipped)
    assert acc.result().decisions == 1.0  # 199 of 200 kept: a frame-level wobble, the sequence stands
    ids = np.arange(12).reshape(3, 4)
    changed = ids.copy()
    changed[2, 0] = 99
    acc = verify._Accumulator("ids", kind="ids")
    acc.add(ids, changed)
    assert acc.result().decisions == pytest.approx(2 / 3)
    plain = verify._Accumulator("logits")
    plain.add(short, short)
    assert plain.result().decisions is None  # not a decision output: no figure


def _decider_and_noisy(tmp_path: Path, seed: int) -> tuple[ir.Model, ir.Model, Path]:
    """The decider, a copy whose weights moved enough to flip decisions, and 8 samples for them."""
    model = io.load_model(toy.save(_decider(), tmp_path / "d.onnx"))
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(seed).standard_normal((8, 12, 4)).astype(np.float32))
    noisy = _decider()
    w = numpy_helper.to_array(noisy.graph.initializer[0])
    noisy.graph.initializer[0].CopyFrom(numpy_helper.from_array(w + 0.3 * np.sign(w), "W"))
    return model, io.load_model(toy.save(noisy, tmp_path / "noisy.onnx")), data


def test_min_decisions_judges_the_decision_outputs(tmp_path: Path) -> None:
    model, candidate, data = _decider_and_noisy(tmp_path, 10)
    spec = DataSpec(source=str(data))
    result = verify.verify_models(model, candidate, spec, budget=budget.Budget(min_decisions=0.98))
    by_name = {o.name: o for o in result.outputs}
    assert by_name["probs"].decisions is not None and by_name["probs"].decisions < 0.98
    assert by_name["ids"].decisions == by_name["probs"].decisions == by_name["logits"].decisions
    assert any("decisions standing" in v for v in result.violations) and not result.passed
    same = verify.verify_models(model, model, spec, budget=budget.Budget(min_decisions=0.98))
    assert same.passed and {o.decisions for o in same.outputs if o.decisions is not None} == {1.0}


def test_decisions_find_the_sample_axis_and_refuse_flattened_classes(tmp_path: Path) -> None:
    """A time-major [T, B, C] output is judged a text line at a time, not a time step at a time; a Softmax
    flattened into [B, T * C] is not per-position classes."""
    rng = np.random.default_rng(11)
    lines = rng.standard_normal((26, 4, 5)).astype(np.float32)  # 26 steps, 4 samples, 5 classes
    flipped = lines.copy()
    flipped[3, 2] = -flipped[3, 2]  # one step of sample 2
    acc = verify._Accumulator("probs", kind="scores")
    acc.add(lines, flipped, samples=4)
    assert acc.result().decisions == 0.75
    flipped[9, 0] = -flipped[9, 0]  # and one of sample 0: 102 of the 104 positions keep their class
    folded = verify._Accumulator("probs", kind="scores")  # no axis as long as the batch: one sample whole
    folded.add(lines.reshape(104, 5), flipped.reshape(104, 5), samples=3)
    assert folded.result().decisions == 0.0 and folded.decided == 1
    graph = helper.make_graph(
        [
            helper.make_node("Softmax", ["x"], ["p"], axis=-1),
            helper.make_node("Flatten", ["p"], ["flat"], axis=1),
        ],
        "flat",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 7])],
        [helper.make_tensor_value_info("flat", TensorProto.FLOAT, [2, 35])],
    )
    model = io.load_model(toy.save(toy._model(graph), tmp_path / "flat.onnx"))
    assert verify.decision_outputs(model) == {}


def test_a_sigmoid_map_is_judged_by_the_iou_of_its_thresholded_positions(tmp_path: Path) -> None:
    """A probability map stands while its positions at or above 0.5 overlap by 0.95 (IoU): a boundary pixel may
    move, a shrunk region fails; background-only samples agree whatever their values below 0.5."""
    graph = helper.make_graph(
        [helper.make_node("Sigmoid", ["x"], ["map"])],
        "seg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("map", TensorProto.FLOAT, ["batch", 1, 8, 8])],
    )
    model = io.load_model(toy.save(toy._model(graph), tmp_path / "seg.onnx"))
    assert verify.decision_outputs(model) == {"map": "probabilities"}
    ref = np.zeros((3, 1, 8, 8), np.float32)
    ref[:2, 0, :, :5] = 0.9  # 40 positive positions in samples 0 and 1; sample 2 is background
    cand = ref.copy()
    cand[0, 0, 0, 0] = 0.4  # one of 40 lost: IoU 39/40 = 0.975, stands
    cand[1, 0, :, 4] = 0.1  # 8 of 40 lost: IoU 0.8, fails
    cand[2] = 0.3  # moved, still below 0.5 everywhere: stands
    acc = verify._Accumulator("map", kind="probabilities")
    acc.add(ref, cand, samples=3)
    assert acc.result().decisions == pytest.approx(2 / 3)


def test_a_sigmoid_output_in_between_is_not_read_as_a_mask() -> None:
    """An image, a gain mask or a matte out of a Sigmoid sits between 0 and 1: thresholding it at 0.5 would flip
    on noise, so it is judged by its values; a binary classifier's one probability per sample always is a decision."""
    rng = np.random.default_rng(12)
    image = rng.uniform(0.3, 0.7, (4, 1, 8, 8)).astype(np.float32)
    nudged = image + rng.normal(0, 1e-3, image.shape).astype(np.float32)
    acc = verify._Accumulator("image", kind="probabilities")
    acc.add(image, nudged, samples=4)
    assert acc.result().decisions is None and acc.result().cosine_min > 0.9999
    flags = np.array([[0.45], [0.55], [0.2], [0.8]], np.float32)  # undecided-looking, but one per sample
    acc = verify._Accumulator("flag", kind="probabilities")
    acc.add(flags, flags[::-1].copy(), samples=4)
    assert acc.result().decisions == 0.0  # every sample crossed 0.5


def test_the_checker_runs_the_reference_once_for_every_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fallback verifies dozens of candidates against one reference: its outputs on the kept verification
    batches are computed once, and every trial's verdict is the one a fresh comparison gives."""
    from graphopt import runtime

    model, candidate, data = _decider_and_noisy(tmp_path, 13)
    spec = DataSpec(source=str(data), batch_size=2)
    checker = verify.Checker(model, spec, budget.Budget(min_decisions=0.98), "cpu", 1)
    runs: list[object] = []
    real = runtime.run

    def counted(session: object, feeds: object, outputs: object = None) -> dict:
        runs.append(session)
        return real(session, feeds, outputs)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime, "run", counted)
    first = checker.check(candidate)[1]
    second = checker.check(candidate)[1]
    same = checker.check(model)[1]
    assert sum(s is checker.ref_session for s in runs) == 4  # 4 batches of 2, run once
    fresh = verify.verify_models(model, candidate, spec, budget=budget.Budget(min_decisions=0.98))
    assert first.to_dict() == second.to_dict() == {**fresh.to_dict(), "device": first.device}
    assert not first.passed and same.passed
