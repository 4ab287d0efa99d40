"""Latency budget: when the output runs slower than allowed, keep in float the layers whose int8 form does not pay.

Q/DQ in a file is a request. ONNX Runtime fuses a quantized layer into an integer kernel only
when the Q/DQ around it match one of its patterns, and even a fused kernel can lose to float
on a CPU without fast int8 dot products (depthwise convolutions, thin products, Q/DQ churn
between small ops). So the placement is measured, not assumed, against the input model:

1. layers ONNX Runtime runs in float although the file quantizes them (its optimized graph
   still has a DequantizeLinear before a float Conv/MatMul/Gemm): their Q/DQ only add work,
   so they go back to float first;
2. then one class of layers at a time (depthwise, grouped, pointwise and spatial
   convolutions, weight products, activation products, Gemm, embedding tables): a class
   stays in float when that makes the model measurably faster (:data:`MIN_GAIN`);
3. if that misses the limit, the pass's faster placement (quantize: every op quantized, as
   ORT's quantizer does, so that ORT fuses more), re-calibrated and kept only within the
   accuracy budget, searched the same way; it is second because it rounds more;
4. when no placement meets the limit, the lossy step is dropped: the output is then the
   exact model, and the report says that int8 does not pay on this model here.

Each trial is timed in alternation with the input model (medians of interleaved runs), so
machine noise hits both alike. A ratio within :data:`NOISE` of the limit meets it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from graphopt import ort_view, registry
from graphopt.errors import DataError, GraphoptError, PassError
from graphopt.passes import edit

logger = logging.getLogger(__name__)

# Interleaved medians of the same model differ by about this much between runs on a shared machine.
NOISE = 0.02
# A class of layers goes back to float only if that makes the whole model at least this much faster.
MIN_GAIN = 0.02
COMPUTE_OPS = ("Conv", "MatMul", "Gemm", "Gather")

Ratio = Callable[[ir.Model], float]  # a candidate's median latency / the input's, timed interleaved
UNFUSED = "layers ONNX Runtime runs in float (Q/DQ not fused)"


@dataclass
class SpeedResult:
    """What the latency search tried and chose."""

    pass_name: str
    limit: float
    ratio_before: float
    ratio_after: float = math.nan
    passed: bool = False
    float_nodes: list[str] = field(default_factory=list)
    # each trial: what changed (an alternative's options, or a class of layers in float), how many
    # layers, the measured ratio, whether it stayed
    tried: list[dict[str, Any]] = field(default_factory=list)
    changed: dict[str, Any] = field(default_factory=dict)  # options of a faster alternative kept
    dropped: bool = False  # no placement met the limit: the step was dropped
    reason: str = ""
    stopped: str = ""  # why the search ended early (its time limit), or empty
    seconds: float = 0.0
    # the model without the step (its input through the exact steps' work so far), timed the same way: the step must
    # run faster than that too, or its int8 form costs accuracy for nothing
    without: float | None = None

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def within(ratio: float, limit: float) -> bool:
    """Whether a measured latency ratio meets ``limit`` (medians vary by :data:`NOISE` between runs)."""
    return ratio <= limit * (1.0 + NOISE)


def bar(limit: float, without: float | None) -> float:
    """The ratio a lossy step's output must meet: the budget's ``limit``, or the model without the step's ratio
    (``without``) where that is faster. A limit of at most 1 asks for speed, and a step that slows the exact model
    down does not give it; a limit above 1 trades speed for size, and only the limit binds."""
    return limit if without is None or limit > 1.0 else min(limit, without)


def layer_class(node: ir.Node) -> str | None:
    """The class a compute layer belongs to for timing, or None for a node that is not one."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    constant = weight is not None and weight.const_value is not None
    if node.op_type == "Conv":
        group = node.attributes.get_int("group", 1)
        shape = weight.const_value.shape if constant else None
        if group > 1:
            return "depthwise convolutions" if shape is not None and shape[1] == 1 else "grouped convolutions"
        if shape is not None and all(d == 1 for d in shape[2:]):
            return "pointwise convolutions"
        return "spatial convolutions"
    if node.op_type == "MatMul":
        return "weight products (MatMul)" if constant else "activation products (MatMul)"
    if node.op_type == "Gemm":
        return "Gemm"
    if (
        node.op_type == "Gather"
        and node.inputs
        and node.inputs[0] is not None
        and node.inputs[0].const_value is not None
    ):
        return "embedding tables (Gather)"
    return None


def classes(model: ir.Model, spec: registry.PassSpec, config: Any) -> dict[str, list[str]]:
    """The named compute layers ``config`` would change, by class (main graph; largest classes first)."""
    op_types = set(getattr(config, "op_types", ()) or COMPUTE_OPS) if spec.lossy and spec.lossy.op_types else None
    found: dict[str, list[str]] = {}
    for node in model.graph:
        if not node.name or (op_types is not None and node.op_type not in op_types):
            continue
        if edit.excluded(node, config.exclude, config.exclude_op_types):
            continue
        kind = layer_class(node)
        if kind is not None:
            found.setdefault(kind, []).append(node.name)
    return dict(sorted(found.items(), key=lambda kv: -len(kv[1])))


def unfused(candidate: ir.Model, names: Sequence[str], device: str, threads: int | None) -> list[str]:
    """Which of ``names`` (compute layers of ``candidate``) ONNX Runtime runs in float after a DequantizeLinear."""
    float_names, float_weights = ort_view.float_layers(candidate, device, threads=threads)
    wanted = set(names)
    found = []
    for node in candidate.graph:
        if node.name not in wanted:
            continue
        reads = [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
        dequantized = [p for p in reads if p.op_type == "DequantizeLinear"]
        if not dequantized:
            continue
        if node.name in float_names or any(
            p.inputs[0] is not None and p.inputs[0].name in float_weights for p in dequantized
        ):
            found.append(node.name)
    return found


@dataclass
class _Trials:
    """Builds and times candidates of one lossy step."""

    spec: registry.PassSpec
    config: Any
    before: ir.Model
    statistics: Any
    ratio: Ratio
    result: SpeedResult
    deadline: float

    def build(self, excluded: Sequence[str], config: Any = None, statistics: Any = None) -> ir.Model:
        model = self.before.clone()
        config = self.config if config is None else config
        statistics = self.statistics if statistics is None else statistics
        try:
            self.spec.apply(model, self.spec.with_excluded(config, excluded), statistics)
        except GraphoptError:
            raise
        except Exception as exc:  # the pass's fault, named like a pipeline step's failure
            message = f"pass {self.spec.name!r} failed in a latency-budget trial: {type(exc).__name__}: {exc}"
            raise PassError(message) from exc
        return model

    def measure(self, label: str, model: ir.Model, count: int | None) -> float:
        if time.monotonic() > self.deadline:
            raise TimeoutError
        value = self.ratio(model)
        self.result.tried.append({"trial": label, "layers": count, "ratio": round(value, 4), "kept": False})
        return value


def search(
    spec: registry.PassSpec,
    config: Any,
    before: ir.Model,
    statistics: Any,
    candidate: ir.Model,
    ratio: Ratio,
    current: float,
    limit: float,
    *,
    score: Callable[[ir.Model], float] | None = None,
    recalibrate: Callable[[Any], Any] | None = None,
    device: str = "cpu",
    threads: int | None = None,
    max_seconds: float = 300.0,
    without: float | None = None,
) -> tuple[SpeedResult, tuple[Any, Any] | None]:
    """Make one lossy step's output meet the latency ``limit``: a faster placement, then layers back to float.

    ``candidate`` is the pipeline's output as it stands (measured at ``current``), ``before``
    the model right before the step and ``statistics`` what its calibrator collected. With
    ``recalibrate`` (config -> statistics) and ``score`` (the accuracy budget's, <= 1 within),
    when the recipe's placement misses the limit, the pass's faster alternatives
    (:meth:`registry.PassSpec.faster`) are timed; one within the accuracy budget that runs
    faster is searched the same way, and kept if it ends faster.
    ``without`` (the ratio of the model without the step) lowers the limit to it: a placement
    slower than the exact model is not one.
    Returns the search's record and the (config, statistics) to re-run the step with, or None
    when the step should be dropped (no placement of its layers met the limit).
    """
    start = time.monotonic()
    result = SpeedResult(spec.name, limit, current, without=without)
    budget = limit
    limit = bar(limit, without)
    trials = _Trials(spec, config, before, statistics, ratio, result, start + max_seconds)
    chosen: list[str] = []
    best = current
    idle: bool | None = None  # the chosen placement runs no integer kernel in ORT (None: not inspected yet)
    try:
        # The recipe's placement first, layers back to float; a faster placement only if that misses the limit:
        # quantizing every op fuses more but rounds more (the accuracy budget is checked, the task metric is not).
        chosen, best = _float_classes(trials, candidate, current, limit, device, threads)
        # a placement ORT runs with no integer kernel gains nothing, however it times: the faster one is tried
        idle = within(best, limit) and best < current and _no_integer_kernel(trials, chosen, device, threads)
        if (idle or not within(best, limit)) and recalibrate is not None and score is not None:
            found = _faster_alternative(trials, current if idle else best, score, recalibrate)
            if found is not None:
                alternative, alt_statistics, model, value, changes = found
                kept = (trials.config, trials.statistics)
                trials.config, trials.statistics = alternative, alt_statistics
                alt_chosen, alt_best = _float_classes(trials, model, value, limit, device, threads)
                if alt_best < best or idle:
                    chosen, best, result.changed, idle = alt_chosen, alt_best, changes, None
                else:
                    trials.config, trials.statistics = kept
    except TimeoutError:
        result.stopped = "time limit"
    if result.stopped:
        result.stopped = f"time limit of {max_seconds:g} s after {len(result.tried)} trials"
        logger.warning("latency search: stopped at its %s", result.stopped)
    result.float_nodes, result.ratio_after = chosen, best
    result.seconds = time.monotonic() - start
    if idle is None:  # the placement taken was not inspected yet
        idle = within(best, limit) and best < current and _no_integer_kernel(trials, chosen, device, threads)
    if idle:
        result.float_nodes, result.changed = [], {}
        result.dropped = True
        result.reason = (
            f"ONNX Runtime runs none of the layers {spec.name} left quantized as an integer kernel (their Q/DQ only "
            f"round; best measured {min(best, current):.2f}×): {spec.name} does not pay on this model here"
        )
        return result, None
    if within(best, limit) and best < current:
        result.passed = True
        options = "".join(f"{k}={v}, " for k, v in result.changed.items())
        result.reason = f"{spec.name} with {options}{len(chosen)} layers kept in float met the limit"
        return result, (spec.with_excluded(trials.config, chosen), trials.statistics)
    # No placement meets the limit: the step is dropped.
    result.dropped = True
    result.float_nodes, result.changed = [], {}
    bound = (
        f"faster than the model without it ({limit:.2f}× the input; "
        if limit < budget
        else f"within {limit:g}× of the input ("
    )
    result.reason = (
        f"no placement of {spec.name}'s layers ran {bound}best measured {min(best, current):.2f}×): "
        f"{spec.name} does not pay on this model here"
    )
    return result, None


def _no_integer_kernel(trials: _Trials, chosen: list[str], device: str, threads: int | None) -> bool:
    """Whether the placement adds Q/DQ of which ONNX Runtime on the CPU fuses none into an integer kernel: it then
    gains nothing for the rounding it costs, whatever a tie in timing says (kept at 1.00-1.02x by noise)."""
    if device != "cpu":
        return False
    model = trials.build(chosen)
    quantize = sum(n.op_type == "QuantizeLinear" for n in model.graph)
    if quantize <= sum(n.op_type == "QuantizeLinear" for n in trials.before.graph):
        return False
    try:
        return ort_view.inspect_runtime(model, device, threads=threads).integer_kernels == 0
    except GraphoptError as exc:  # advice about kernels never fails a run
        logger.info("latency search: the placement's kernels were not inspected: %s", exc)
        return False


def _float_classes(
    trials: _Trials, candidate: ir.Model, best: float, limit: float, device: str, threads: int | None
) -> tuple[list[str], float]:
    """Put classes of layers back to float, one at a time, each kept only if the model gets faster."""
    chosen: list[str] = []
    if within(best, limit):
        return chosen, best
    layers = classes(trials.before, trials.spec, trials.config)
    slow = unfused(candidate, [n for names in layers.values() for n in names], device, threads)
    groups = [(UNFUSED, slow)] if slow else []
    groups += [(kind, [n for n in names if n not in slow]) for kind, names in layers.items()]
    for label, names in groups:
        if within(best, limit):
            break
        if not names:
            continue
        try:
            value = trials.measure(f"in float: {label}", trials.build([*chosen, *names]), len(names))
        except TimeoutError:  # keep what the trials so far found; the caller records the stop
            trials.result.stopped = "time limit"
            break
        if value < best * (1.0 - MIN_GAIN):
            chosen, best = [*chosen, *names], value
            trials.result.tried[-1]["kept"] = True
    return chosen, best


def _faster_alternative(
    trials: _Trials, best: float, score: Callable[[ir.Model], float], recalibrate: Callable[[Any], Any]
) -> tuple[Any, Any, ir.Model, float, dict[str, Any]] | None:
    """The fastest of the pass's faster alternatives within the accuracy budget, if it beats ``best``:
    (config, statistics, model, ratio, changed options)."""
    found = None
    for alternative in trials.spec.faster(trials.config):
        try:
            statistics = recalibrate(alternative)
        except DataError as exc:
            logger.info("latency search: alternative %s skipped: %s", alternative, exc)
            continue
        changes = {
            f.name: getattr(alternative, f.name)
            for f in dataclasses.fields(alternative)
            if getattr(alternative, f.name) != getattr(trials.config, f.name)
        }
        model = trials.build([], alternative, statistics)
        value = trials.measure(", ".join(f"{k}={v}" for k, v in changes.items()), model, None)
        if value >= best * (1.0 - MIN_GAIN):
            continue
        accuracy = score(model)
        trials.result.tried[-1]["accuracy_score"] = round(accuracy, 4)
        if accuracy > 1.0:  # over the accuracy budget: not a placement to keep
            continue
        trials.result.tried[-1]["kept"] = True
        found, best = (alternative, statistics, model, value, changes), value
    return found


def _trial(entry: dict[str, Any]) -> str:
    count = "" if entry["layers"] is None else f" ({entry['layers']})"
    verdict = " kept" if entry["kept"] else ""
    if "accuracy_score" in entry and not entry["kept"]:
        verdict = f" over the accuracy budget (score {entry['accuracy_score']:.2f})"
    return f"{entry['trial']}{count}: {entry['ratio']:.2f}×{verdict}"


def summary(result: dict[str, Any]) -> str:
    """One line on what the latency budget did, from a report's ``speed`` entry."""
    head = f"latency budget ≤ {result['limit']:g}× the input"
    without = result.get("without")
    if without is not None and bar(result["limit"], without) < result["limit"]:
        head += f", and faster than the model without {result['pass_name'] or 'its lossy steps'} ({without:.2f}×)"
    if not result["tried"] and not result["dropped"]:
        verdict = "met" if result["passed"] else "missed"
        return f"{head}: {verdict} ({result['ratio_before']:.2f}×)"
    if result["dropped"]:
        change = f"{result['pass_name']} dropped ({result['reason']})"
    else:
        options = "".join(f"{k}={v}, " for k, v in result["changed"].items())
        change = f"{result['pass_name']} with {options}{len(result['float_nodes'])} layers kept in float"
    verdict = "met" if result["passed"] else f"{result['pass_name']} dropped" if result["dropped"] else "MISSED"
    tried = "; ".join(_trial(t) for t in result["tried"])
    stopped = f"; search stopped at its {result['stopped']}" if result["stopped"] else ""
    return (
        f"{head}: {verdict}, {result['ratio_before']:.2f}× → {result['ratio_after']:.2f}×: {change}"
        + (f"; tried: {tried}" if tried else "")
        + stopped
    )
