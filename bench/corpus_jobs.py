"""One bench job of `bench_corpus.py`: one tool on one corpus model, run in its own process.

A job writes the tool's output model, then measures it against the fp32 input in ONNX Runtime: the checker, a
session and a run on every evaluation sample, parity (exact tools) or the model's task metric (lossy ones), the
latency ratio (1 thread, interleaved with fp32, median over samples) and the size ratio. Whatever step fails is
recorded in the row with its first error line; the stages reached (loaded, ran, valid) say how far it got.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench.bench_fold import count_nodes
from bench.common import peak_rss_mb, reset_peak_rss_mb
from models.corpus.base import CorpusModel, Feed
from models.corpus.fetch import external_data_locations

Row = dict[str, Any]
VERIFY_SAMPLES = 16  # graphopt's own verification: the default recipe's sample count, taken from the eval feeds


@dataclass(frozen=True)
class Tool:
    """A bench column: which table it goes to, whether it must keep outputs equal, and how it runs."""

    label: str
    section: str  # "fold" (exact, compared with onnxslim/onnxsim), "lossy" (graphopt), "ort" (ORT quantize anchors)
    exact: bool
    run: Callable[[Path, Path, list[Feed], list[Feed], Row], None]  # src, dst, calib, eval feeds, row to fill


def first_line(exc: BaseException) -> str:
    """The error's type and first line, without the temporary paths and status codes ORT puts in front."""
    text = str(exc).strip()
    text = text.splitlines()[0] if text else ""
    text = re.sub(r"Load model from \S+ failed:\s*|\[ONNXRuntimeError\] : \d+ : ", "", text)
    return f"{type(exc).__name__}: {text}"[:400]


def _axis0_total(feeds: list[Feed]) -> int:
    return sum(max((a.shape[0] if np.ndim(a) else 1 for a in feed.values()), default=1) for feed in feeds)


def _graphopt_recipe(spec: str, calib: list[Feed], feeds: list[Feed]) -> Any:
    import graphopt
    from graphopt.recipe import Recipe, VerifySettings, load_recipe, parse_passes

    if spec == "fold-noverify":  # file in, file out, like onnxslim and onnxsim: no verification in the timing
        return Recipe(passes=parse_passes(["fold"]), verify=VerifySettings(enabled=False))
    # Given feeds pass through one at a time as they are (fixed batch-1 inputs work), and ``samples`` caps the sum
    # of the first input's axis 0, not the number of feeds: samples=len(feeds) would use only 2 of 32 feeds of
    # 16 windows each. Counting every feed's largest axis 0 lets each feed through.
    calibration = graphopt.DataSpec(source=calib, samples=_axis0_total(calib))
    if spec == "quantize-noverify":  # file in, file out, like ORT's quantize_static: its time and memory
        quantize = parse_passes(["quantize:mode=static"])
        return Recipe(passes=quantize, calibration=calibration, verify=VerifySettings(enabled=False))
    verify_feeds = feeds[:VERIFY_SAMPLES]
    verify_data = graphopt.DataSpec(source=verify_feeds, samples=_axis0_total(verify_feeds))
    if spec == "default":
        base = load_recipe(Path(graphopt.__file__).parent / "recipes" / "default.yaml")
        # report_only: an output over the recipe's budget is still measured here; the verdict goes in the row.
        # threads=1: the latency budget is judged with the thread count this bench times with.
        verify = dataclasses.replace(base.verify, data=verify_data, report_only=True, threads=1)
        return dataclasses.replace(base, calibration=calibration, verify=verify)
    verify = VerifySettings(data=verify_data, report_only=True)
    return Recipe(passes=parse_passes([spec]), calibration=calibration, verify=verify)


def graphopt_tool(spec: str) -> Callable[[Path, Path, list[Feed], list[Feed], Row], None]:
    def run(src: Path, dst: Path, calib: list[Feed], feeds: list[Feed], row: Row) -> None:
        import graphopt

        recipe = _graphopt_recipe(spec, calib, feeds)
        model = graphopt.load(src)
        row["loaded"] = True
        result = graphopt.optimize(model, recipe)
        row["ran"] = True
        graphopt.save(result.model, dst, protect=[src])
        verification = result.report.verification
        if verification is not None:
            row["graphopt_verify"] = "passed" if verification.passed else "; ".join(verification.violations)[:200]
            decided = {o.name: o.decisions for o in verification.outputs if o.decisions is not None}
            if decided:  # decision outputs: share of verification samples whose decisions stood
                row["decisions"] = decided
        if result.report.fallback:
            row["float_nodes"] = len(result.report.fallback.get("float_nodes", []))
        skipped = {p.name: str(p.details.get("skipped", "")) for p in result.report.passes}
        dropped = [name for name, why in skipped.items() if why.startswith("dropped by the accuracy budget")]
        if dropped:  # fallback.drop: no placement held the accuracy budget, the step is gone
            row["note"] = f"accuracy budget: {', '.join(dropped)} dropped (the fallback found no placement)"
        speed = result.report.speed
        if speed is not None:
            keys = ("ratio_before", "ratio_after", "passed", "dropped", "float_nodes", "changed", "without")
            row["speed"] = {k: speed.get(k) for k in keys}
            if speed["dropped"]:
                without = f", {speed['without']:.2f}× without it" if speed.get("without") is not None else ""
                row["note"] = f"latency budget: int8 dropped ({speed['ratio_before']:.2f}× with it{without})"
            elif speed["tried"]:
                options = "".join(f"{k}={v}, " for k, v in speed["changed"].items() if k != "outliers")
                row["note"] = (
                    f"latency budget: {options}{len(speed['float_nodes'])} layers back to float "
                    f"({speed['ratio_before']:.2f}× → {speed['ratio_after']:.2f}×)"
                )

    return run


def onnxslim_tool(src: Path, dst: Path, calib: list[Feed], feeds: list[Feed], row: Row) -> None:
    import onnxslim

    row["loaded"] = True  # onnxslim loads inside slim(); a load failure shows as its error
    with contextlib.redirect_stdout(io.StringIO()):  # it prints a summary table per call
        onnxslim.slim(str(src), str(dst))
    row["ran"] = True


def onnxsim_tool(src: Path, dst: Path, calib: list[Feed], feeds: list[Feed], row: Row) -> None:
    import onnxsim

    proto = onnx.load(str(src))
    row["loaded"] = True
    simplified, ok = onnxsim.simplify(proto)
    if not ok:
        raise RuntimeError("onnxsim's own output check failed")
    row["ran"] = True
    onnx.save(simplified, str(dst))


def ort_quantize_tool(activation: str, op_types: Sequence[str] | None) -> Callable[..., None]:
    def run(src: Path, dst: Path, calib: list[Feed], feeds: list[Feed], row: Row) -> None:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.samples = iter(calib)

            def get_next(self) -> Feed | None:
                return next(self.samples, None)

        with tempfile.TemporaryDirectory() as tmp:
            pre = Path(tmp) / "pre.onnx"
            try:  # ORT's recommended pre-processing; when it fails, quantize the model as it is and say so
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            except Exception as exc:  # ORT raises many types here
                row["note"] = f"quant_pre_process failed ({first_line(exc)[:80]}); quantized without it"
                pre = src
            row["loaded"] = True
            quantize_static(
                str(pre),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=getattr(QuantType, activation),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(op_types) if op_types else None,
            )
        row["ran"] = True

    return run


TOOLS: dict[str, Tool] = {
    "fold": Tool("graphopt fold", "fold", True, graphopt_tool("fold-noverify")),
    "onnxslim": Tool("onnxslim", "fold", True, onnxslim_tool),
    "onnxsim": Tool("onnxsim", "fold", True, onnxsim_tool),
    "default": Tool("graphopt default recipe", "lossy", False, graphopt_tool("default")),
    "quantize": Tool("graphopt quantize (static)", "lossy", False, graphopt_tool("quantize:mode=static")),
    # ablations: the same quantization with weights rounded to nearest (no GPTQ), or without SmoothQuant
    "quantize_nearest": Tool(
        "graphopt quantize (static), rounding=nearest",
        "lossy",
        False,
        graphopt_tool("quantize:mode=static,rounding=nearest"),
    ),
    "quantize_nosmooth": Tool(
        "graphopt quantize (static), smooth=false", "lossy", False, graphopt_tool("quantize:mode=static,smooth=false")
    ),
    # the quantize job without graphopt's own verification: time and memory beside ORT quantize_static's
    "quantize_noverify": Tool(
        "graphopt quantize (static), no verification", "lossy", False, graphopt_tool("quantize-noverify")
    ),
    "weight_only": Tool("graphopt weight_only", "lossy", False, graphopt_tool("weight_only")),
    "fp16": Tool("graphopt fp16", "lossy", False, graphopt_tool("fp16")),
    # `pattern=2:4` reads as the YAML 1.1 base-60 integer 124; the pattern is named n:m with n and m apart.
    "prune24": Tool("graphopt prune 2:4", "lossy", False, graphopt_tool("prune:pattern=n:m,n=2,m=4")),
    "prune_structured": Tool("graphopt prune_structured", "lossy", False, graphopt_tool("prune_structured")),
    "ort_s8": Tool("ORT QDQ s8 act", "ort", False, ort_quantize_tool("QInt8", None)),
    "ort_u8": Tool("ORT QDQ u8 act", "ort", False, ort_quantize_tool("QUInt8", None)),
    "ort_u8_ops": Tool(
        "ORT QDQ u8 Conv/MatMul/Gemm", "ort", False, ort_quantize_tool("QUInt8", ("Conv", "MatMul", "Gemm"))
    ),
}


def model_bytes(path: Path) -> int:
    """The model file plus every external data file it names."""
    header = onnx.load(str(path), load_external_data=False)
    extra = {path.parent / loc for loc in external_data_locations(header)}
    return path.stat().st_size + sum(p.stat().st_size for p in extra if p.is_file())


def _session(path: Path, optimization: str) -> Any:
    """A 1-thread CPU session; with ORT's rewrites off (exact tools), weight pre-packing is off too.

    Pre-packing is the kernel-level twin of a graph rewrite: ORT pre-packs a MatMul weight only when
    it is a constant, and the packed kernel rounds differently (rel L2 2.6e-7 on one 256x768 MatMul).
    A tool that turns a loop-carried weight into a constant would otherwise be charged with ORT's rounding.
    """
    from graphopt import runtime

    exact = optimization == "disable"
    return runtime.create_session(str(path), threads=1, optimization=optimization, prepacking=not exact)


def _run_all(session: Any, feeds: list[Feed], names: list[str]) -> list[list[np.ndarray]]:
    return [session.run(names, feed) for feed in feeds]


def _check_shapes(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]], names: list[str]) -> None:
    """A tool that changes an output's shape changed the model (e.g. trusting a wrong declared shape)."""
    for index, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        for name, r, c in zip(names, ref, cand, strict=True):
            if np.shape(r) != np.shape(c):
                raise ValueError(f"output {name!r} has shape {np.shape(c)}, fp32 {np.shape(r)} (sample {index})")


def rel_l2(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
    """Largest over outputs of ||cand - ref|| / ||ref||, pooled over samples (0 when both are zero)."""
    worst = 0.0
    for index in range(len(reference[0])):
        diff = sum(
            float(np.sum((np.asarray(c[index], np.float64) - np.asarray(r[index], np.float64)) ** 2))
            for r, c in zip(reference, candidate, strict=True)
        )
        norm = sum(float(np.sum(np.asarray(r[index], np.float64) ** 2)) for r in reference)
        worst = max(worst, 0.0 if diff == 0 else float(np.sqrt(diff / norm)) if norm > 0 else float("inf"))
    return worst


def latency_ratio(src: Path, dst: Path, feeds: list[Feed], runs: int) -> float:
    """Median over samples of candidate / fp32 median latency; 1 thread, the two timed in alternation."""
    from graphopt import runtime

    sessions = {"fp32": _session(src, "all"), "candidate": _session(dst, "all")}
    ratios = []
    for feed in feeds:
        timing = runtime.interleaved_latency(sessions, feed, warmup=2, runs=runs)
        ratios.append(timing["candidate"].median_ms / timing["fp32"].median_ms)
    return statistics.median(ratios)


def measure(model: CorpusModel, tool: Tool, src: Path, dst: Path, feeds: list[Feed], row: Row, args: Any) -> None:
    """Fill ``row`` with validity, parity or task metric, latency and size of ``dst`` against ``src``."""
    try:
        onnx.checker.check_model(str(src))
    except onnx.checker.ValidationError:
        row["checker"] = "input fails"  # nothing to hold the output to
    else:
        try:
            onnx.checker.check_model(str(dst))
            row["checker"] = "ok"
        except onnx.checker.ValidationError as exc:  # still run it: does ORT accept what the checker refuses?
            row["checker"] = first_line(exc)
    # Exact tools are compared with ORT's graph rewrites off, so the difference is the tool's alone.
    optimization = "disable" if tool.exact else "all"
    reference_session = _session(src, optimization)
    names = [o.name for o in reference_session.get_outputs()]
    candidate = _run_all(_session(dst, optimization), feeds, names)
    row["valid"] = row["checker"] in ("ok", "input fails")
    reference = _run_all(reference_session, feeds, names)
    _check_shapes(reference, candidate, names)
    if tool.exact:
        row["rel_l2"] = rel_l2(reference, candidate)
        # As a user runs both: ORT's default rewrites on. ORT folds a BatchNormalization into its Conv at load
        # with the arithmetic fold uses, so what remains here is what the tool changed beyond ORT's own rewrites.
        deployed = _session(src, "all")
        row["rel_l2_deployed"] = rel_l2(_run_all(deployed, feeds, names), _run_all(_session(dst, "all"), feeds, names))
    row["score"] = float(model.score(reference, candidate))
    row["nodes_in"], row["nodes_out"] = count_nodes(src), count_nodes(dst)
    row["size_ratio"] = model_bytes(dst) / model_bytes(src)
    row["latency_ratio"] = latency_ratio(src, dst, feeds[: args.latency_samples], args.latency_runs)


def base_row(model: CorpusModel, key: str) -> Row:
    """The row of job ``key`` on ``model`` before anything ran: what a failure leaves."""
    tool = TOOLS[key]
    return {
        "model": model.name,
        "tool": tool.label,
        "key": key,
        "section": tool.section,
        "metric": model.metric,
        "goal": model.goal,
        "loaded": False,
        "ran": False,
        "valid": False,
    }


def run_job(
    model: CorpusModel, key: str, src: Path, workdir: Path, calib: list[Feed], feeds: list[Feed], args: Any
) -> Row:
    """Run tool ``key`` on ``model`` and measure its output; failures end up in the row, never raised."""
    tool = TOOLS[key]
    row = base_row(model, key)
    dst = workdir / f"{model.name}.{key}.onnx"
    # the high-water mark restarts here, so that loading the inputs (often the process's peak) does not count
    row["rss_before_mb"], row["rss_reset"] = reset_peak_rss_mb(), True
    start = time.perf_counter()
    try:
        tool.run(src, dst, calib, feeds, row)
        row["seconds"] = time.perf_counter() - start
        row["peak_rss_mb"] = peak_rss_mb()  # the tool's run, before the output is measured
        measure(model, tool, src, dst, feeds, row, args)
    except Exception as exc:  # every failure is a row, the bench goes on
        row.setdefault("seconds", time.perf_counter() - start)
        row["error"] = first_line(exc)
    return row
