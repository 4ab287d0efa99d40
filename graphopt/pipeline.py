"""Build and run a pass pipeline, then verify the result against the input model.

    load ──> reference (a clone, untouched)
      └────> candidate ── pass 1 ── [calibrate] ── pass 2 ── ... ──> verify vs reference ──> report

Each pass is timed and the model is measured before and after it. With ``check`` on,
``onnx.checker`` runs after every pass so a broken graph is blamed on the pass that broke
it, with the passes that ran before it named too.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from graphopt import budget as budget_rules
from graphopt import (
    fallback,
    hardware,
    io,
    localize,
    opset,
    ort_view,
    prober,
    recipe,
    registry,
    runtime,
    serialize,
    speed,
    stats,
    targets,
    verify,
)
from graphopt.calibration.sources import DEFAULT_CALIBRATION_SAMPLES, DataSpec, input_specs, iter_batches
from graphopt.errors import AccuracyBudgetError, DataError, GraphoptError, PassError
from graphopt.passes import edit
from graphopt.report import PassRecord, Report

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]
_COLLECT = object()  # sentinel: the step collects its own statistics
RecipeLike = recipe.Recipe | str | os.PathLike[str] | Mapping[str, Any] | Sequence[str | recipe.PassStep]


@dataclass
class Result:
    """What :func:`optimize` returns: the optimized model and its report."""

    model: ir.Model
    report: Report


@dataclass(frozen=True)
class Snapshot:
    """A lossy step of a run, as the accuracy fallback needs it."""

    index: int  # position in the pipeline
    step: recipe.PassStep
    before: ir.Model  # the model right before the step
    statistics: Any  # what its calibrator collected

    @property
    def spec(self) -> registry.PassSpec:
        return self.step.spec


@dataclass
class Pipeline:
    """An ordered list of passes, run in place on a model."""

    steps: Sequence[recipe.PassStep]
    check: bool = False
    keep_snapshots: bool = False
    records: list[PassRecord] = field(default_factory=list)
    # Lossy steps as they were about to run: what the accuracy fallback re-runs with more
    # nodes left alone (read through :meth:`lossy_snapshots`).
    _snapshots: list[Snapshot] = field(default_factory=list)
    # The model right after the last step that changes the function on purpose (an
    # adapter merge): what the output must then match instead of the input.
    new_reference: ir.Model | None = None
    lifted_constants: int = 0  # Constant-node weights turned into initializers before the first step
    # Steps dropped by the latency budget (their int8 form did not pay): index -> why
    skipped: dict[int, str] = field(default_factory=dict)
    # The latency ratio of the model right before a lossy step, by the step's index (the latency budget's bar); a
    # re-run from an earlier step changes that model, so it forgets the later entries
    exact_ratios: dict[int, float] = field(default_factory=dict)

    def run(
        self, model: ir.Model, *, calibration: DataSpec | None = None, progress: ProgressCallback | None = None
    ) -> list[PassRecord]:
        """Run every step on ``model`` (in place) and return one record per step.

        Before a lossy step, weights stored as Constant nodes become initializers (an exact
        change): every lossy pass then sees them as the weights they are.
        """
        self.records, self._snapshots, self.new_reference, self.skipped = [], [], None, {}
        for step in self.steps:  # a typo in ``exclude`` would leave in the pass what the user meant to keep out
            missing = edit.unmatched_patterns(model, getattr(step.config, "exclude", ()) or ())
            if missing:
                logger.warning(
                    "%s: exclude %s matches no node name and no weight name in the model; it excludes nothing",
                    step.name,
                    ", ".join(repr(p) for p in missing),
                )
        if any(not step.spec.exact for step in self.steps):
            self.lifted_constants = edit.lift_constant_weights(model)
        self.run_from(model, 0, calibration=calibration, progress=progress)
        return self.records

    def run_from(
        self,
        model: ir.Model,
        first: int,
        *,
        calibration: DataSpec | None = None,
        progress: ProgressCallback | None = None,
        statistics: Any = _COLLECT,
    ) -> None:
        """Run steps ``first``... in place, replacing their records; ``statistics`` feeds step ``first``."""
        del self.records[first:]
        for index in range(first, len(self.steps)):
            step = self.steps[index]
            if progress is not None:
                progress(index, len(self.steps), step.name)
            if index in self.skipped:
                after = self.records[-1].after if self.records else stats.model_stats(model)
                details = {"skipped": self.skipped[index]}
                self.records.append(
                    PassRecord(step.name, _options(step.config), 0.0, False, False, after, after, details)
                )
                continue
            given = statistics if index == first else _COLLECT
            self.records.append(self._run_step(model, index, step, calibration, given))
        if progress is not None:
            progress(len(self.steps), len(self.steps), "done")

    def _run_step(
        self, model: ir.Model, index: int, step: recipe.PassStep, calibration: DataSpec | None, statistics: Any
    ) -> PassRecord:
        spec = step.spec
        # The previous step measured this model already (records stop right before ``index``).
        before = self.records[-1].after if self.records else stats.model_stats(model)
        start = time.perf_counter()
        if statistics is _COLLECT:
            # The calibrator decides whether this config needs data (e.g. dynamic quantization does not).
            statistics = spec.collect(model, calibration, step.config)
        snapshot = self.keep_snapshots and not spec.exact
        if snapshot:
            self._snapshots.append(Snapshot(index, step, model.clone(), statistics))
        try:
            pass_, result = spec.apply(model, step.config, statistics)
        except GraphoptError:
            raise
        except Exception as exc:
            raise PassError(f"{self._where(index)} failed: {type(exc).__name__}: {exc}") from exc
        if result.model is not model:
            raise PassError(f"{self._where(index)} returned a new model; graphopt passes must work in place.")
        # ONNX Runtime refuses a body output that names an outer value; a fold or a lift can make one.
        edit.guard_subgraph_outputs(model)
        if spec.changes_function_for(step.config):
            self.new_reference = model.clone()
        seconds = time.perf_counter() - start
        if self.check:
            self._check(model, index)
        # A snapshotted step's sparsity is what the fallback's alternatives must keep.
        after = stats.model_stats(model, sparsity=snapshot)
        details = getattr(pass_, "details", None)
        return PassRecord(
            name=step.name,
            options=_options(step.config),
            seconds=seconds,
            modified=result.modified,
            exact=spec.exact,
            before=before,
            after=after,
            details=dict(details) if isinstance(details, Mapping) else {},
        )

    def lossy_snapshots(self) -> list[Snapshot]:
        """The lossy steps of the last run, last first (with ``keep_snapshots``)."""
        return list(reversed(self._snapshots))

    def rerun(self, snapshot: Snapshot, config: Any, statistics: Any, calibration: DataSpec | None = None) -> ir.Model:
        """Run the pipeline again from ``snapshot``'s step, with ``config`` and ``statistics`` for it.

        The step's config is replaced for good; records and snapshots from that step on are
        taken again (a later search, the latency budget's after the accuracy fallback, starts
        from the steps as they now run). Returns the new output model.
        """
        steps = list(self.steps)
        steps[snapshot.index] = replace(snapshot.step, config=config)
        self.steps = steps
        self._snapshots = [s for s in self._snapshots if s.index < snapshot.index]
        self.exact_ratios = {i: r for i, r in self.exact_ratios.items() if i <= snapshot.index}
        model = snapshot.before.clone()
        self.run_from(model, snapshot.index, calibration=calibration, statistics=statistics)
        return model

    def skip(self, snapshot: Snapshot, reason: str, calibration: DataSpec | None = None) -> ir.Model:
        """Run the pipeline again from ``snapshot``'s step without that step; its record gives ``reason``."""
        self.skipped[snapshot.index] = reason
        self._snapshots = [s for s in self._snapshots if s.index < snapshot.index]
        self.exact_ratios = {i: r for i, r in self.exact_ratios.items() if i <= snapshot.index}
        model = snapshot.before.clone()
        self.run_from(model, snapshot.index, calibration=calibration)
        return model

    def produced(self, snapshot: Snapshot) -> stats.ModelStats:
        """What ``snapshot``'s step produced in the last run (with sparsity)."""
        return self.records[snapshot.index].after

    def _check(self, model: ir.Model, index: int) -> None:
        try:
            serialize.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise PassError(f"{self._where(index)} left a model that fails onnx.checker: {exc}") from exc

    def _where(self, index: int) -> str:
        name = self.steps[index].name
        before = [s.name for s in self.steps[:index]]
        return f"pass {index + 1} {name!r}" + (f" (after {', '.join(before)})" if before else "")


def _options(config: Any) -> dict[str, Any]:
    return asdict(config) if is_dataclass(config) and not isinstance(config, type) else {}


def as_recipe(recipe_or_passes: RecipeLike, known: registry.Registry = registry.REGISTRY) -> recipe.Recipe:
    """Accept a Recipe, a recipe file, a mapping, or a list of pass names/steps (names looked up in ``known``)."""
    if isinstance(recipe_or_passes, recipe.Recipe):
        return recipe_or_passes
    if isinstance(recipe_or_passes, (str, os.PathLike)) and Path(recipe_or_passes).suffix in (".yaml", ".yml", ".json"):
        return recipe.load_recipe(recipe_or_passes, known=known)
    if isinstance(recipe_or_passes, str) and targets.is_builtin(recipe_or_passes):
        return replace(
            recipe.load_recipe(targets.path(recipe_or_passes), known=known), target=targets.canonical(recipe_or_passes)
        )
    if isinstance(recipe_or_passes, str):
        return recipe.Recipe(passes=recipe.parse_passes([recipe_or_passes], known=known))
    if isinstance(recipe_or_passes, Mapping):
        return recipe.parse_recipe(recipe_or_passes, known=known)
    return recipe.Recipe(passes=recipe.parse_passes(list(recipe_or_passes), known=known))


def optimize(
    model_or_path: ir.Model | str | os.PathLike[str],
    recipe_or_passes: RecipeLike,
    *,
    calibration: DataSpec | str | os.PathLike[str] | None = None,
    device: str | None = None,
    progress: ProgressCallback | None = None,
    known: registry.Registry = registry.REGISTRY,
) -> Result:
    """Run a recipe on a model and verify the result against it in ONNX Runtime.

    Args:
        model_or_path: An onnx_ir model (left unchanged) or the path of an .onnx file.
        recipe_or_passes: A :class:`recipe.Recipe`, a recipe file, a recipe mapping, or a
            list of pass names / ``name:k=v`` strings.
        calibration: Calibration data (overrides the recipe's): a DataSpec or a data path.
        device: ``cpu`` or ``cuda`` (overrides the recipe's).
        progress: Called as ``progress(done, total, what)``: a pass's name while passes run, then
            with ``done == total`` each later step (verification, the fallback, timing).
        known: The passes recipe names refer to: the built-in registry, or one extended with
            your own passes (``graphopt.registry.REGISTRY.with_passes(spec)``).

    Raises:
        AccuracyBudgetError: when the output is over the recipe's budget (unless the recipe
            asks for a report only); the error carries the report.
    """
    plan = as_recipe(recipe_or_passes, known)
    device = device or plan.device
    runtime.check_device(device)
    prober.warm()  # the output's crash probe (at verification or save) then finds ONNX Runtime imported
    if isinstance(calibration, (str, os.PathLike)):
        calibration = DataSpec(
            source=calibration, samples=(plan.calibration or DataSpec(samples=DEFAULT_CALIBRATION_SAMPLES)).samples
        )
    calibration = calibration or plan.calibration
    _check_calibration(plan, calibration)
    # a model given loaded (graphopt.load) still names its file in the report
    loaded = isinstance(model_or_path, ir.Model)
    source = next(iter(io.source_files(model_or_path)), None) if loaded else Path(model_or_path)
    reference = model_or_path if isinstance(model_or_path, ir.Model) else io.load_model(model_or_path)
    candidate, opset_change = _fit_opset(reference, plan, device, calibration)
    pipeline = Pipeline(
        list(plan.passes),
        check=plan.check,
        keep_snapshots=plan.verify.enabled and (plan.fallback.enabled or plan.budget.max_latency_ratio is not None),
    )
    records = pipeline.run(candidate, calibration=calibration, progress=progress)
    report = Report(
        input_path=str(source) if source else None,
        device=device,
        passes=records,
        before=records[0].before if records else stats.model_stats(reference),
        after=records[-1].after if records else stats.model_stats(candidate),
    )
    report.opset = opset_change.to_dict() if opset_change else None
    if plan.target:
        report.target = {"name": plan.target, "cpu": hardware.describe_cpu(), "choices": targets.choices(plan)}
    report.lifted_constants = pipeline.lifted_constants
    if plan.verify.enabled:
        target = pipeline.new_reference or reference
        stage = _stages(progress, len(plan.passes))
        candidate = _verify(report, pipeline, target, candidate, plan, device, calibration, stage)
    if io.CHECKER_FAILURE in reference.meta:  # saving then lets ONNX Runtime's load decide, as for the input
        candidate.meta[io.CHECKER_FAILURE] = reference.meta[io.CHECKER_FAILURE]
    return Result(candidate, report)


def _check_calibration(plan: recipe.Recipe, calibration: DataSpec | None) -> None:
    """Before anything runs: a step that cannot run without calibration data, given none, is a user error."""
    if calibration is not None:
        return
    for step in plan.passes:
        if step.spec.needs_data(step.config):
            target = f" (target {plan.target})" if plan.target else ""
            raise DataError(
                f"pass {step.name!r}{target} needs calibration data as configured (it reads data for "
                f"{step.spec.data}); give --calib DATA (an .npz, a folder of <input>.npy, or a folder of per-sample "
                ".npz files), --calib-script FILE.py:FUNCTION, or a recipe `calibration: {data: ...}`."
            )
        if note := step.spec.without_data(step.config):
            logger.warning("no calibration data: %s.", note)


def _stages(progress: ProgressCallback | None, total: int) -> Callable[[str], None]:
    """``stage(what)``: tell ``progress`` that a step after the passes started (verification, fallback, timing)."""
    return (lambda what: progress(total, total, what)) if progress is not None else (lambda what: None)


def _fit_opset(
    reference: ir.Model, plan: recipe.Recipe, device: str, calibration: DataSpec | None
) -> tuple[ir.Model, opset.OpsetChange | None]:
    """A copy of the input to run the passes on, at the opset they want when a conversion keeps it equal."""
    wanted = opset.wanted_opset(plan.passes)
    if not wanted or opset.model_opset(reference) >= wanted:
        return reference.clone(), None
    batches = list(itertools.islice(iter_batches(_check_data(plan, calibration), input_specs(reference)), 2))
    return opset.upgrade(reference, wanted, batches, device)


def _check_data(plan: recipe.Recipe, calibration: DataSpec | None, specs: list[Any] | None = None) -> DataSpec:
    """The inputs verification uses: the recipe's, else calibration data, else random ones.

    From the calibration data, verification takes the samples after those calibration used
    (held out), when ``specs`` are given and such samples exist; otherwise it reuses the
    calibration samples (the report says which).
    """
    data = plan.verify.data
    if data.source is None and calibration is not None and calibration.source is not None:
        data = replace(data, source=calibration.source)
        held_out = replace(data, skip=calibration.samples)
        if specs is not None and next(iter_batches(held_out, specs), None):
            return held_out
    return data


def _describe_data(report: Report, calibration: DataSpec | None, verification: DataSpec) -> None:
    """Name the data each step used in the report; say so when verification reuses calibration samples."""
    report.data = {"calibration": calibration.describe()} if calibration is not None else {}
    report.data["verification"] = verification.describe()
    if calibration is not None:
        same = calibration.source is not None and verification.source is calibration.source
        if same and verification.skip < calibration.samples:
            report.data["note"] = (
                "verification reused calibration samples (the data has no others): an over-fitted calibration would "
                "not show; give --verify-data with other samples"
            )


def _check_token_data(result: verify.VerifyResult, plan: recipe.Recipe, data: DataSpec) -> None:
    """A language model judged by its next tokens needs text: over random ids and cache values its perplexity
    means nothing, and a fallback chasing it only burns time. Unless the budget is only reported, that is a user
    error naming the fix."""
    if data.source is not None or plan.verify.report_only:
        return
    if budget_rules.for_outputs(result.outputs, plan.budget) is plan.budget:
        return  # no token limit, or no language-model logits: the budget's own limits judge
    raise DataError(
        "this is a language model, judged by its perplexity on token windows (budget: "
        f"{budget_rules.describe(budget_rules.for_outputs(result.outputs, plan.budget))}), but verification had "
        "only generated inputs (random token ids and cache values). Give token windows: --calib DIR or "
        "--verify-data DIR, a folder of per-sample .npz files with input_ids, attention_mask and, for a KV-cache "
        "export, empty past_key_values.* (length 0); or set verify.report_only."
    )


def _verify(
    report: Report,
    pipeline: Pipeline,
    reference: ir.Model,
    candidate: ir.Model,
    plan: recipe.Recipe,
    device: str,
    calibration: DataSpec | None,
    stage: Callable[[str], None] = lambda what: None,
) -> ir.Model:
    """Verify; over budget, try the fallback; then time the final model and raise if still over."""
    data = _check_data(plan, calibration, input_specs(reference))
    _describe_data(report, calibration, data)
    threads = plan.verify.threads
    # One reference session serves the verification, every fallback trial and the timing.
    checker = verify.Checker(reference, data, plan.budget, device, threads)
    stage("verifying against the input")
    result = checker.check(candidate, probe=True)[1]
    _check_token_data(result, plan, data)
    errors = None  # layer-wise errors of ``candidate``, when the fallback measured them already
    if not result.passed and plan.fallback.enabled and pipeline.lossy_snapshots() and plan.budget.max_latency_ratio:
        # Over both budgets, latency decides first which layers stay int8: where no placement pays, the step goes
        # and no accuracy search runs (on a detector whose int8 form ran 1.5x the input, that search spent its
        # whole time limit on placements the latency budget then dropped); where one pays, the accuracy search
        # starts from it, among the layers whose int8 form is worth keeping.
        stage("latency budget: timing against the input before the accuracy search")
        candidate, result = _meet_latency(report, pipeline, checker, candidate, result, plan, calibration, True)
    if not result.passed and plan.fallback.enabled and pipeline.lossy_snapshots():
        stage("accuracy fallback: searching layers to keep in float")
        candidate, result, errors = _fall_back(report, pipeline, checker, candidate, result, plan, calibration)
    if not result.passed and plan.fallback.drop and pipeline.lossy_snapshots():
        stage("accuracy budget: dropping the lossy steps it could not hold to it")
        candidate, result = _drop_lossy(report, pipeline, checker, result, calibration)
        errors = None
    if plan.budget.max_latency_ratio is not None:
        kept = candidate
        stage("latency budget: timing against the input")
        candidate, result = _meet_latency(report, pipeline, checker, candidate, result, plan, calibration)
        errors = errors if candidate is kept else None
    report.verification = result
    report.runtime = _runtime_view(candidate, device, threads)
    if plan.verify.layerwise and any(r.modified and not r.exact for r in report.passes):
        if errors is None:
            stage("layer-wise comparison")
            errors = localize.layer_errors(reference, candidate, data, device=device, threads=threads)
        report.layers = [e.to_dict() for e in errors]
    if plan.verify.latency_runs > 0:
        stage("timing the output against the input")
        report.latency = checker.timed(candidate, plan.verify.latency_runs)
        report.latency_inputs = checker.timing_shapes()
        report.decode_latency = checker.timed_decode(candidate, plan.verify.latency_runs)
    # The latency budget bounds what lossy changes cost: an output with none left is reported, not judged (the
    # exact passes have nothing to trade; a real slowdown is the "slower" warning), so noise cannot fail it.
    lossy_left = any(r.modified and not r.exact for r in report.passes)
    slow = report.speed is not None and not report.speed["passed"] and lossy_left
    if slow and not plan.verify.report_only:
        s = report.speed
        why = f" {s['reason']}." if s["reason"] else ""
        raise AccuracyBudgetError(
            f"over the latency budget: the output runs {s['ratio_after']:.2f}× the input's latency, "
            f"budget {s['limit']:g}×.{why} Raise budget.max_latency_ratio (--max-latency-ratio), or set "
            "verify.report_only.",
            report=report,
        )
    if not result.passed and not plan.verify.report_only:
        suspects = [r.name for r in report.passes if r.modified and not r.exact] or [
            r.name for r in report.passes if r.modified
        ]
        tried = " The fallback found no set of float layers within its limits." if report.fallback else ""
        raise AccuracyBudgetError(
            "over the accuracy budget: "
            + "; ".join(result.violations)
            + (f". Passes that changed the model: {', '.join(suspects)}." if suspects else ".")
            + tried
            + " Loosen the budget, exclude layers, or set verify.report_only.",
            report=report,
        )
    return candidate


def _meet_latency(
    report: Report,
    pipeline: Pipeline,
    checker: verify.Checker,
    candidate: ir.Model,
    result: verify.VerifyResult,
    plan: recipe.Recipe,
    calibration: DataSpec | None,
    accuracy_next: bool = False,
) -> tuple[ir.Model, verify.VerifyResult]:
    """Hold the output to ``budget.max_latency_ratio``: lossy layers whose int8 form does not pay go back to float.

    The last lossy step is searched first (:func:`speed.search`); a step with no placement
    that meets the limit is dropped. With ``accuracy_next`` (the accuracy fallback runs after
    this search), a placement that meets the limit is kept even though the output is still
    over the accuracy budget. Returns the model and its verification.
    """
    limit = plan.budget.max_latency_ratio
    assert limit is not None
    runs = max(plan.verify.latency_runs, 20)

    def ratio(model: ir.Model) -> float:
        return checker.latency_ratio(model, runs)

    exact = pipeline.exact_ratios

    def without(snapshot: Snapshot) -> float | None:
        """The ratio of the model without ``snapshot``'s step (None where the step changed nothing)."""
        if not pipeline.records[snapshot.index].modified:
            return None
        if snapshot.index not in exact:
            exact[snapshot.index] = ratio(snapshot.before)
        return exact[snapshot.index]

    snapshots = pipeline.lossy_snapshots()
    if snapshots and pipeline.records[snapshots[0].index].modified and snapshots[0].index not in exact:
        # The output and the model without the step in one series: the two are compared with each other
        current, exact[snapshots[0].index] = checker.latency_ratios([candidate, snapshots[0].before], runs)
    else:
        current = ratio(candidate)
    last = without(snapshots[0]) if snapshots else None
    outcome = speed.SpeedResult(
        snapshots[0].spec.name if snapshots else "",
        limit,
        current,
        current,
        passed=speed.within(current, speed.bar(limit, last)),
        without=last,
    )
    earlier = report.speed  # a search before the accuracy fallback's (see _verify)
    still_runs = earlier is not None and (
        earlier["dropped"] or any(s.spec.name == earlier["pass_name"] for s in pipeline.lossy_snapshots())
    )
    if still_runs and (earlier["tried"] or earlier["dropped"]) and (outcome.passed or not pipeline.lossy_snapshots()):
        # Nothing to search now: the report keeps what that search did (unless the accuracy budget dropped the step
        # it placed since), re-measured on the final output.
        outcome = speed.SpeedResult(**{**earlier, "ratio_after": current, "passed": outcome.passed})
    for snapshot in pipeline.lossy_snapshots() if not outcome.passed else ():
        outcome, chosen = speed.search(
            snapshot.spec,
            snapshot.step.config,
            snapshot.before,
            snapshot.statistics,
            candidate,
            ratio,
            current,
            limit,
            score=checker.score,
            recalibrate=_recalibrator(snapshot.spec, snapshot.before, calibration),
            device=checker.device,
            threads=checker.threads,
            max_seconds=plan.fallback.max_seconds,
            without=without(snapshot),
        )
        if chosen is not None:
            candidate = pipeline.rerun(snapshot, *chosen, calibration)
            result = checker.check(candidate)[1]
            current = outcome.ratio_after = ratio(candidate)
            if (result.passed or accuracy_next) and speed.within(current, speed.bar(limit, outcome.without)):
                outcome.passed = True
                break
            # Confirmed on the whole pipeline's output, the placement missed: float it is.
            if not result.passed:  # fast enough, but the passes after the step moved its outputs over the budget
                outcome.reason = (
                    f"the placement found ({outcome.reason}) missed the accuracy budget once the whole pipeline "
                    f"re-ran with it ({'; '.join(result.violations[:1])}): none found was both within the limit "
                    "and accurate"
                )
            else:
                outcome.reason = (
                    f"the placement found ({outcome.reason}) missed the limit "
                    f"({current:.2f}× re-measured against {speed.bar(limit, outcome.without):.2f}×) once the "
                    "pipeline re-ran with it: int8 does not pay on this model here"
                )
            outcome.dropped, outcome.float_nodes, outcome.changed = True, [], {}
        candidate, result = _skip(
            report, pipeline, checker, snapshot, f"dropped by the latency budget: {outcome.reason}", calibration
        )
        current = outcome.ratio_after = ratio(candidate)
        outcome.passed = speed.within(current, limit)
        if outcome.passed:
            break
    report.passes, report.after = pipeline.records, pipeline.records[-1].after
    report.speed = outcome.to_dict()
    return candidate, result


def _drop_lossy(
    report: Report,
    pipeline: Pipeline,
    checker: verify.Checker,
    result: verify.VerifyResult,
    calibration: DataSpec | None,
) -> tuple[ir.Model, verify.VerifyResult]:
    """``fallback.drop``: drop lossy steps, the last first, until the output meets the accuracy budget, as the latency
    budget drops a step with no placement that pays. The default job then writes the model without the step, and
    the report says why, where a run that asks for the step itself fails (exit 1)."""
    searched = report.fallback
    if searched is None:
        found = "the accuracy fallback is off"
    elif searched.get("passed"):  # its trials skip the exact passes after the step; the re-run with them missed
        found = "the layers the fallback kept in float missed it once the whole pipeline re-ran with them"
    else:
        stopped = f" ({searched['stopped']})" if searched.get("stopped") else ""
        found = f"the fallback found no layers to keep in float within its limits{stopped}"
    dropped = []
    for snapshot in pipeline.lossy_snapshots():  # checked non-empty by the caller
        reason = f"dropped by the accuracy budget: {found} ({'; '.join(result.violations[:2])})"
        candidate, result = _skip(report, pipeline, checker, snapshot, reason, calibration)
        dropped.append(snapshot.spec.name)
        if result.passed:
            break
    if searched is not None:  # its float layers are gone with the step: the report says the step went instead
        searched["dropped"] = dropped
    return candidate, result


def _skip(
    report: Report,
    pipeline: Pipeline,
    checker: verify.Checker,
    snapshot: Snapshot,
    reason: str,
    calibration: DataSpec | None,
) -> tuple[ir.Model, verify.VerifyResult]:
    """The pipeline's output without ``snapshot``'s step (its record gives ``reason``), and its verification."""
    candidate = pipeline.skip(snapshot, reason, calibration)
    report.passes, report.after = pipeline.records, pipeline.records[-1].after
    return candidate, checker.check(candidate)[1]


def _recalibrator(spec: registry.PassSpec, before: ir.Model, calibration: DataSpec | None) -> Any:
    """config -> statistics for ``spec`` on the model as it was before the step (None without a calibrator)."""
    if not spec.needs_calibration:
        return None
    return lambda alternative: spec.collect(before, calibration, alternative)


def _runtime_view(candidate: ir.Model, device: str, threads: int | None) -> dict[str, Any] | None:
    try:
        return ort_view.inspect_runtime(candidate, device, threads=threads).to_dict()
    except GraphoptError as exc:  # the summary is advice; never fail a run over it
        logger.warning("could not summarise ONNX Runtime's optimized graph: %s", exc)
        return None


def _fall_back(
    report: Report,
    pipeline: Pipeline,
    checker: verify.Checker,
    candidate: ir.Model,
    result: verify.VerifyResult,
    plan: recipe.Recipe,
    calibration: DataSpec | None,
) -> tuple[ir.Model, verify.VerifyResult, list[localize.LayerError] | None]:
    """Re-run a lossy step with the fewest layers in float that meet the budget.

    Returns the model, its verification, and its layer-wise errors when it is
    the model that came in (nothing met the budget).

    The last lossy step is searched first; when no search over it meets the budget (e.g.
    ``fp16`` after ``weight_only``, where the loss is the earlier step's), the one before it.
    """
    # The worst tensors by SQNR point at the nodes to try first (one run, ~1.3x a verification).
    errors = localize.layer_errors(
        checker.reference, candidate, checker.data, device=checker.device, threads=checker.threads
    )
    blamed = localize.blame(checker.reference, candidate, errors)
    baseline = result.score(plan.budget)
    outcome = None
    for snapshot in pipeline.lossy_snapshots():
        before = snapshot.before
        suspects = []
        for name in blamed:
            # A tensor can stay quantized because other readers need it; its readers can go float whole.
            readers = [n.name for n in before.graph for v in n.inputs if v is not None and v.name == name and n.name]
            suspects += [f"tensor:{name}", *readers]
        outcome, config, statistics = fallback.search(
            snapshot.spec,
            snapshot.step.config,
            before,
            snapshot.statistics,
            checker.score,
            baseline,
            plan.fallback,
            suspects=suspects,
            latency=checker.latency,
            recalibrate=_recalibrator(snapshot.spec, before, calibration),
            produced=pipeline.produced(snapshot),
        )
        if outcome.passed or report.fallback is None:
            report.fallback = outcome.to_dict()
        if outcome.passed:
            break
    if outcome is None or not outcome.passed:
        return candidate, result, errors
    config = snapshot.spec.with_excluded(config, outcome.float_nodes)
    candidate = pipeline.rerun(snapshot, config, statistics, calibration)
    report.passes, report.after = pipeline.records, pipeline.records[-1].after
    result = checker.check(candidate)[1]
    return candidate, result, None
