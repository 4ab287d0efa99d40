"""Build and run a pass pipeline, then verify the result against the input model.

    load ──> reference (a clone, untouched)
      └────> candidate ── pass 1 ── [calibrate] ── pass 2 ── ... ──> verify vs reference ──> report

Each pass is timed and the model is measured before and after it. With ``check`` on,
``onnx.checker`` runs after every pass so a broken graph is blamed on the pass that broke
it, with the passes that ran before it named too.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from graphopt import io, recipe, registry, runtime, stats, verify
from graphopt.calibration.sources import DataSpec, input_specs, iter_batches
from graphopt.errors import AccuracyBudgetError, GraphoptError, PassError
from graphopt.report import PassRecord, Report

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]
RecipeLike = recipe.Recipe | str | os.PathLike[str] | Mapping[str, Any] | Sequence[str | recipe.PassStep]


@dataclass
class Result:
    """What :func:`optimize` returns: the optimized model and its report."""

    model: ir.Model
    report: Report


@dataclass
class Pipeline:
    """An ordered list of passes, run in place on a model."""

    steps: Sequence[recipe.PassStep]
    check: bool = False
    records: list[PassRecord] = field(default_factory=list)

    def run(
        self, model: ir.Model, *, calibration: DataSpec | None = None, progress: ProgressCallback | None = None
    ) -> list[PassRecord]:
        """Run every step on ``model`` (in place) and return one record per step."""
        self.records = []
        for index, step in enumerate(self.steps):
            if progress is not None:
                progress(index, len(self.steps), step.name)
            self.records.append(self._run_step(model, index, step, calibration))
        if progress is not None:
            progress(len(self.steps), len(self.steps), "done")
        return self.records

    def _run_step(self, model: ir.Model, index: int, step: recipe.PassStep, calibration: DataSpec | None) -> PassRecord:
        spec = registry.get_spec(step.name)
        before = stats.model_stats(model)
        start = time.perf_counter()
        statistics = self._calibrate(model, spec, step, calibration)
        pass_ = spec.build(step.config, statistics)
        try:
            result = pass_(model)
        except GraphoptError:
            raise
        except Exception as exc:
            raise PassError(f"{self._where(index)} failed: {type(exc).__name__}: {exc}") from exc
        if result.model is not model:
            raise PassError(f"{self._where(index)} returned a new model; graphopt passes must work in place.")
        seconds = time.perf_counter() - start
        if self.check:
            self._check(model, index)
        after = stats.model_stats(model)
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

    def _calibrate(
        self, model: ir.Model, spec: registry.PassSpec, step: recipe.PassStep, calibration: DataSpec | None
    ) -> Any:
        # The calibrator decides whether this config needs data (e.g. dynamic quantization does not).
        return spec.calibrate(model, calibration, step.config) if spec.calibrate is not None else None

    def _check(self, model: ir.Model, index: int) -> None:
        try:
            io.check_model(model)
        except onnx.checker.ValidationError as exc:
            raise PassError(f"{self._where(index)} left a model that fails onnx.checker: {exc}") from exc

    def _where(self, index: int) -> str:
        name = self.steps[index].name
        before = [s.name for s in self.steps[:index]]
        return f"pass {index + 1} {name!r}" + (f" (after {', '.join(before)})" if before else "")


def _options(config: Any) -> dict[str, Any]:
    return asdict(config) if is_dataclass(config) and not isinstance(config, type) else {}


def as_recipe(recipe_or_passes: RecipeLike) -> recipe.Recipe:
    """Accept a Recipe, a recipe file, a mapping, or a list of pass names/steps."""
    if isinstance(recipe_or_passes, recipe.Recipe):
        return recipe_or_passes
    if isinstance(recipe_or_passes, (str, os.PathLike)) and Path(recipe_or_passes).suffix in (".yaml", ".yml", ".json"):
        return recipe.load_recipe(recipe_or_passes)
    if isinstance(recipe_or_passes, str):
        return recipe.Recipe(passes=recipe.parse_passes([recipe_or_passes]))
    if isinstance(recipe_or_passes, Mapping):
        return recipe.parse_recipe(recipe_or_passes)
    return recipe.Recipe(passes=recipe.parse_passes(list(recipe_or_passes)))


def optimize(
    model_or_path: ir.Model | str | os.PathLike[str],
    recipe_or_passes: RecipeLike,
    *,
    calibration: DataSpec | str | os.PathLike[str] | None = None,
    device: str | None = None,
    progress: ProgressCallback | None = None,
) -> Result:
    """Run a recipe on a model and verify the result against it in ONNX Runtime.

    Args:
        model_or_path: An onnx_ir model (left unchanged) or the path of an .onnx file.
        recipe_or_passes: A :class:`recipe.Recipe`, a recipe file, a recipe mapping, or a
            list of pass names / ``name:k=v`` strings.
        calibration: Calibration data (overrides the recipe's): a DataSpec or a data path.
        device: ``cpu`` or ``cuda`` (overrides the recipe's).
        progress: Called as ``progress(done, total, pass name)``.

    Raises:
        AccuracyBudgetError: when the output is over the recipe's budget (unless the recipe
            asks for a report only); the error carries the report.
    """
    plan = as_recipe(recipe_or_passes)
    device = device or plan.device
    runtime.check_device(device)
    if isinstance(calibration, (str, os.PathLike)):
        calibration = DataSpec(source=calibration, samples=(plan.calibration or DataSpec(samples=128)).samples)
    calibration = calibration or plan.calibration
    source = None if isinstance(model_or_path, ir.Model) else Path(model_or_path)
    reference = model_or_path if isinstance(model_or_path, ir.Model) else io.load_model(model_or_path)
    candidate = reference.clone()
    pipeline = Pipeline(plan.passes, check=plan.check)
    records = pipeline.run(candidate, calibration=calibration, progress=progress)
    report = Report(
        input_path=str(source) if source else None,
        device=device,
        passes=records,
        before=stats.model_stats(reference),
        after=stats.model_stats(candidate),
    )
    if plan.verify.enabled:
        _verify_into(report, reference, candidate, plan, device, calibration)
    return Result(candidate, report)


def _verify_into(
    report: Report,
    reference: ir.Model,
    candidate: ir.Model,
    plan: recipe.Recipe,
    device: str,
    calibration: DataSpec | None,
) -> None:
    data = plan.verify.data
    if data.source is None and calibration is not None and calibration.source is not None:
        data = DataSpec(source=calibration.source, samples=data.samples, batch_size=data.batch_size, dims=data.dims)
    threads = plan.verify.threads
    result = verify.verify_models(reference, candidate, data, device=device, budget=plan.budget, threads=threads)
    report.verification = result
    if plan.verify.latency_runs > 0:
        feeds = next(iter_batches(data, input_specs(reference)))
        sessions = {
            "reference": runtime.create_session(reference, device, threads=threads),
            "optimized": runtime.create_session(candidate, device, threads=threads),
        }
        report.latency = runtime.interleaved_latency(sessions, feeds, runs=plan.verify.latency_runs)
    if not result.passed and not plan.verify.report_only:
        suspects = [r.name for r in report.passes if r.modified and not r.exact] or [
            r.name for r in report.passes if r.modified
        ]
        raise AccuracyBudgetError(
            "over the accuracy budget: "
            + "; ".join(result.violations)
            + (f". Passes that changed the model: {', '.join(suspects)}." if suspects else ".")
            + " Loosen the budget, exclude layers, or set verify.report_only.",
            report=report,
        )
