"""What each ``graphopt`` command does, once :mod:`graphopt.cli` has parsed its arguments.

Kept apart from the parser so that ``graphopt --help`` loads neither ONNX nor ONNX Runtime.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import onnx_ir as ir
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from graphopt import budget as budget_rules
from graphopt import demo, destinations, io, ort_view, plots, recipe, registry, render, runtime, stats, targets, verify
from graphopt.calibration.sources import (
    DEFAULT_CALIBRATION_SAMPLES,
    DataSpec,
    input_specs,
    iter_batches,
    load_script,
)
from graphopt.errors import AccuracyBudgetError, GraphoptError, RecipeError
from graphopt.pipeline import optimize
from graphopt.report import Report

console = Console(stderr=False)
err_console = Console(stderr=True)


def _dims(pairs: Sequence[str]) -> dict[str, int]:
    dims = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        digits = value.strip()
        if not sep or not (digits.isascii() and digits.isdigit()):
            raise RecipeError(
                f"--dim {pair!r}: expected NAME=INT with INT >= 0, e.g. --dim batch=4 "
                "(0 for an empty KV cache: --dim past_sequence_length=0)."
            )
        dims[name.strip()] = int(value)
    return dims


def _default_recipe() -> Path:
    return targets.path("cpu")


def _recipe_source(args: argparse.Namespace) -> tuple[Path | str, str]:
    """The recipe file to read and the built-in target it is (empty for a user's file)."""
    if args.target and args.recipe:
        raise RecipeError("give either --target or --recipe, not both (--target NAME is the built-in recipe NAME).")
    name = args.target or args.recipe
    if name is None:
        return targets.path("cpu"), "cpu"
    if args.target or targets.is_builtin(name):
        return targets.path(name), targets.canonical(name)
    return name, ""


def _build_recipe(args: argparse.Namespace) -> recipe.Recipe:
    source, target = _recipe_source(args)
    base = recipe.load_recipe(source, known=args.known, passes_given=bool(args.passes))
    # --pass with a recipe: the recipe's settings (verification, budget, device), the flags' passes.
    passes = tuple(recipe.parse_pass_arg(p, known=args.known) for p in args.passes) if args.passes else base.passes
    data = base.verify.data
    dims = {**dict(data.dims or {}), **_dims(args.dim)}
    verify_data = dataclasses.replace(
        data, source=args.verify_data or data.source, samples=args.samples or data.samples, dims=dims
    )
    # Everything the recipe says (layerwise included) unless a flag overrides it.
    settings = dataclasses.replace(
        base.verify,
        enabled=base.verify.enabled and not args.no_verify,
        data=verify_data,
        report_only=base.verify.report_only or args.report_only,
        threads=args.threads or base.verify.threads,
    )
    return recipe.Recipe(
        passes=passes,
        calibration=base.calibration,
        verify=settings,
        budget=dataclasses.replace(base.budget, max_latency_ratio=_latency_limit(args, base)),
        device=args.device or base.device,
        check=base.check or args.check,
        # Passes named one by one are what the user asked for: one that cannot meet the budget fails the run (exit 1)
        # rather than being dropped, as the default job drops it (fallback.drop).
        fallback=dataclasses.replace(base.fallback, drop=False) if _passes_alone(args) else base.fallback,
        target="" if args.passes else target,  # its own passes make it another recipe
    )


def _latency_limit(args: argparse.Namespace, base: recipe.Recipe) -> float | None:
    """The latency budget: the flag's, else the recipe's; passes named by --pass alone get none unless asked.

    The default job drops a lossy step whose output runs slower than its input; passes a user named
    one by one (``--pass fp16`` on a CPU) are what they asked for, so they are timed and warned about, not dropped.
    """
    if args.max_latency_ratio is not None:
        return float(args.max_latency_ratio)
    if _passes_alone(args):
        return None
    return base.budget.max_latency_ratio


def _passes_alone(args: argparse.Namespace) -> bool:
    """``--pass`` with neither ``--recipe`` nor ``--target``: the user's own list of passes."""
    return bool(args.passes) and not (args.recipe or args.target)


def cmd_optimize(args: argparse.Namespace) -> int:
    plan = _build_recipe(args)
    source = Path(args.model)
    if args.output.endswith(("/", os.sep)) and not Path(args.output).exists():
        if not Path(args.output).parent.is_dir():
            raise RecipeError(f"-o {args.output}: its parent folder does not exist; create it first.")
        Path(args.output).mkdir()  # -o NEW/: a folder, as written
    if Path(args.output).is_dir():  # -o FOLDER: <folder>/<stem>.<target>.onnx
        args.output = str(Path(args.output) / f"{source.stem}.{plan.target or 'opt'}.onnx")
    output = Path(args.output)
    calibration = None
    if args.calib and args.calib_script:
        raise RecipeError("give either --calib or --calib-script, not both.")
    if args.calib or args.calib_script:
        base = plan.calibration or DataSpec(samples=DEFAULT_CALIBRATION_SAMPLES)
        given = load_script(args.calib_script) if args.calib_script else args.calib
        calibration = dataclasses.replace(base, source=given)
    reference = io.load_model(source)
    reads = _reads(args, plan, calibration, io.source_files(reference))
    destinations.check_destinations(_destinations(args), destinations.protected_files(reads))
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=err_console, transient=True
    ) as bar:
        task = bar.add_task("optimizing", total=len(plan.passes))

        def progress(done: int, total: int, name: str) -> None:
            what = f"pass {done + 1}/{total}: {name}" if done < total else name
            bar.update(task, completed=done, description=what)

        try:
            result = optimize(reference, plan, calibration=calibration, progress=progress)
        except AccuracyBudgetError as exc:
            if isinstance(exc.report, Report):
                _write_reports(exc.report, args)
                render.render_report(console, exc.report)
            raise
    saved = io.save_model(
        result.model,
        output,
        protect=[path for _, path in reads],
        external_data=True if args.external_data else None,
        sparse=args.sparse,
        keep_debug_metadata=args.keep_debug_metadata,
    )
    if result.report.runtime is not None:
        ort_view.note_sparse_initializers(result.report.runtime, saved.sparse_initializers)
    result.report.output_path = str(saved.path)
    result.report.output_bytes_on_disk = saved.bytes_on_disk
    render.render_report(console, result.report)
    _write_reports(result.report, args)
    console.print(f"wrote {saved.path}" + (f" and {saved.data_path.name}" if saved.data_path else ""))
    return 0


def _reads(
    args: argparse.Namespace, plan: recipe.Recipe, calibration: DataSpec | None, model_files: Sequence[Path]
) -> list[tuple[str, Path]]:
    """Every file ``optimize`` reads, labelled: none of them may be a destination."""
    reads = [("the input model", p) for p in model_files[:1]]
    reads += [("the input's external data", p) for p in model_files[1:]]
    script = args.calib_script.rpartition(":")[0] if args.calib_script else None
    sources = [("the recipe", args.recipe), ("the calibration data", calibration and calibration.source)]
    sources.append(("the calibration script", script))
    sources.append(("the verification data", plan.verify.data.source))
    reads += [(label, Path(p)) for label, p in sources if isinstance(p, (str, os.PathLike))]
    return reads


def _destinations(args: argparse.Namespace) -> list[destinations.Destination]:
    """Every file ``optimize`` may write, named by the flag that asks for it."""
    output = Path(args.output)
    found = [
        destinations.Destination("the output (-o)", output),
        destinations.Destination("the output's data file", output.parent / f"{output.name}.data"),
    ]
    reports = (("--report", args.report), ("--report-md", args.report_md))
    found += [destinations.Destination(flag, Path(p)) for flag, p in reports if p]
    if args.report_dir:
        folder = Path(args.report_dir)
        found += [
            destinations.Destination(f"--report-dir's {name}", folder / name, creates_folder=True)
            for name in ("report.json", "report.md", *plots.PLOT_NAMES)
        ]
    return found


def _write_reports(report: Report, args: argparse.Namespace) -> None:
    if args.report:
        destinations.write_text(Path(args.report), report.to_json())
    if args.report_md:
        destinations.write_text(Path(args.report_md), report.to_markdown())
    if args.report_dir:
        folder = Path(args.report_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with destinations.staging(folder) as tmp:
            (tmp / "report.json").write_text(report.to_json(), encoding="utf-8")
            (tmp / "report.md").write_text(report.to_markdown(), encoding="utf-8")
            names = ["report.json", "report.md", *(p.name for p in plots.write_plots(report, tmp))]
            for name in names:
                os.replace(tmp / name, folder / name)
        console.print(f"report in {folder}: " + ", ".join(names))


def cmd_inspect(args: argparse.Namespace) -> int:
    model = io.load_model(args.model)
    model_stats = stats.model_stats(model, sparsity=True)
    inputs = [_value_info(v) for v in model.graph.inputs if v.name not in model.graph.initializers]
    outputs = [_value_info(v) for v in model.graph.outputs]
    if args.json:
        console.print_json(json.dumps({**model_stats.to_dict(), "inputs": inputs, "outputs": outputs}))
        return 0

    def text(values: list[dict[str, object]]) -> str:
        return ", ".join(f"{v['name']} {v['dtype']} {v['shape']}" for v in values)

    render.render_stats(console, args.model, model_stats, {"inputs": text(inputs), "outputs": text(outputs)})
    return 0


def _value_info(value: ir.Value) -> dict[str, object]:
    """A graph input or output as inspect shows it: dtypes by their ONNX names, as for the weights."""
    shape = None if value.shape is None else [d if isinstance(d, int) else str(d) for d in value.shape]
    return {"name": value.name, "dtype": value.dtype.name if value.dtype else None, "shape": shape}


def _data_from_args(args: argparse.Namespace, default_samples: int) -> DataSpec:
    return DataSpec(
        source=args.data,
        samples=args.samples or default_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        dims=_dims(args.dim),
    )


def cmd_verify(args: argparse.Namespace) -> int:
    reference, candidate = io.load_model(args.reference), io.load_model(args.candidate)
    budget = budget_rules.Budget(
        max_abs=args.max_abs,
        max_rel_l2=args.max_rel_l2,
        min_cosine=args.min_cosine,
        min_top1=args.min_top1,
        min_decisions=args.min_decisions,
        max_perplexity_increase=args.max_perplexity_increase,
        min_token_top1=args.min_token_top1,
    )
    if not budget_rules.describe(budget):  # no limit given: judge by the default recipe's, never pass silently
        budget = recipe.load_recipe(_default_recipe(), known=args.known).budget
    data = _data_from_args(args, 16)
    result = verify.verify_models(reference, candidate, data, device=args.device, budget=budget, threads=args.threads)
    render.render_verification(console, result)
    return 0 if result.passed else 1


def cmd_bench(args: argparse.Namespace) -> int:
    """Latency of one model, or of several timed in alternation (noise hits them alike) with ratios to the first."""
    models = [io.load_model(path) for path in args.models]
    feeds = next(iter_batches(_data_from_args(args, args.batch_size), input_specs(models[0])))
    shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
    if len(models) == 1:
        # alone, a session is timed as it is deployed: with ORT's default thread spinning
        session = runtime.create_session(models[0], args.device, threads=args.threads, spinning=True)
        latency = runtime.measure_latency(session, feeds, warmup=args.warmup, runs=args.runs)
        console.print(
            f"{args.models[0]} on {args.device} ({', '.join(session.get_providers())}), "
            f"threads={args.threads or 'default'}, inputs {shapes}: median {latency.median_ms:.3f} ms, "
            f"p90 {latency.p90_ms:.3f} ms, min {latency.min_ms:.3f} ms over {latency.runs} runs after {args.warmup} "
            "warm-up"
        )
        return 0
    _same_inputs(args.models, models)
    # Spinning threads of one session would steal the cores of the next: timing sessions do not spin.
    sessions = {
        f"{i}": runtime.create_session(m, args.device, threads=args.threads, spinning=False)
        for i, m in enumerate(models)
    }
    warm = 0.2 if args.warmup else 0.0  # --warmup 0 means none
    timed = runtime.interleaved_latency(sessions, feeds, warmup=args.warmup, runs=args.runs, warmup_seconds=warm)
    first = timed["0"].median_ms
    console.print(
        f"on {args.device}, threads={args.threads or 'default'}, inputs {shapes}, {args.runs} runs each in "
        f"alternation after {args.warmup} warm-up (thread spinning off):"
    )
    for i, path in enumerate(args.models):
        t = timed[f"{i}"]
        console.print(
            f"  {path}: median {t.median_ms:.3f} ms, p90 {t.p90_ms:.3f} ms"
            + ("" if i == 0 else f", {t.median_ms / first:.2f}× the first"),
            soft_wrap=True,  # a path is never split
        )
    return 0


def _same_inputs(paths: Sequence[str], models: Sequence[ir.Model]) -> None:
    """Models compared on one set of feeds must take the same inputs."""
    names = [sorted(spec.name for spec in input_specs(m)) for m in models]
    for path, found in zip(paths[1:], names[1:], strict=True):
        if found != names[0]:
            raise RecipeError(
                f"{path} takes inputs {', '.join(found)} but {paths[0]} takes {', '.join(names[0])}: "
                "bench compares models with the same inputs."
            )


def cmd_demo(args: argparse.Namespace) -> int:
    return demo.run_demo(console, Path(args.out) if args.out else None)


COMMANDS = {
    "optimize": cmd_optimize,
    "inspect": cmd_inspect,
    "verify": cmd_verify,
    "bench": cmd_bench,
    "demo": cmd_demo,
}


def run(args: argparse.Namespace, known: registry.Registry) -> int:
    """Run the parsed command: exit code 0 ok, 1 over budget, 2 user error, 3 pass failed, 130 interrupted."""
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console, show_path=False)])
    if not args.verbose:  # the libraries' warnings (onnxscript's version converter falling back) say what the report
        for library in ("onnxscript", "onnx_ir"):  # says in graphopt's words; -v shows them
            logging.getLogger(library).setLevel(logging.ERROR)
    args.known = known
    # signal handlers can only be set from the main thread; elsewhere SIGTERM keeps its default
    handles_sigterm = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if handles_sigterm else None
    try:
        return int(COMMANDS[args.command](args))
    except GraphoptError as exc:
        # one line, never re-wrapped: logs and grep see the whole message
        err_console.print(f"[red]error[/red]: {escape(str(exc))}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("interrupted: nothing was written.")
        return 130
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM (``kill``, a scheduler's time limit, a container stop) ends a run as Ctrl-C does: a save
    under way removes its temporary folder and the command exits 130."""
    raise KeyboardInterrupt
