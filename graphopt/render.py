"""Rich renderings of reports, model statistics and the pass list, for the CLI."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from graphopt import speed
from graphopt.budget import token_summary
from graphopt.report import Report, decode_line, fallback_outcome, latency_line, outcome_warnings
from graphopt.stats import ModelStats
from graphopt.verify import VerifyResult


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB" if n >= 2**20 else f"{n:,} B"


def render_report(console: Console, report: Report) -> None:
    table = Table(title="passes", title_justify="left")
    for column in ("pass", "time (s)", "changed", "nodes", "parameters", "weights"):
        table.add_column(column, justify="right" if column not in ("pass", "changed") else "left")
    for p in report.passes:
        table.add_row(
            p.name,
            f"{p.seconds:.3f}",
            "yes" if p.modified else "no",
            f"{p.before.nodes} → {p.after.nodes}",
            f"{p.before.parameters:,} → {p.after.parameters:,}",
            f"{_mib(p.before.bytes)} → {_mib(p.after.bytes)}",
        )
    console.print(table)
    before, after = report.before, report.after
    console.print(
        f"model: {before.nodes} → {after.nodes} nodes, weights {_mib(before.bytes)} → {_mib(after.bytes)}"
        + (f", file {_mib(report.output_bytes_on_disk)}" if report.output_bytes_on_disk else "")
    )
    if report.data:
        for step, text in report.data.items():
            style = "[yellow]warning[/yellow]: " if step == "note" else f"{step} data: "
            console.print(style + text, soft_wrap=True)
    if report.target:
        t = report.target
        console.print(f"target {t['name']} on {t['cpu']}" + "".join(f"\n  {c}" for c in t["choices"]))
    if report.latency:
        console.print(latency_line(report))
    if report.decode_latency:
        console.print(decode_line(report.decode_latency).rstrip("."))
    if report.opset:
        o = report.opset
        console.print(f"opset {o['before']} → {o['after']} (the passes want {o['wanted']}): {o['reason']}")
    if report.fallback:
        f = report.fallback
        reached = "" if f.get("dropped") else "reached" if f["passed"] else "[red]did not reach[/red]"
        console.print(
            f"accuracy fallback on {f['pass_name']}: "
            + (f"{reached} the budget after {f['trials']} trials; " if reached else "")
            + "".join(f"options changed: {k}={v}; " for k, v in (f.get("changed") or {}).items() if reached)
            + fallback_outcome(f)
        )
        if f.get("stopped"):
            console.print(f"[yellow]warning[/yellow]: the fallback search stopped early, at its {f['stopped']}")
    if report.speed:
        style = "" if report.speed["passed"] else "[red]"
        console.print(style + speed.summary(report.speed), soft_wrap=True)
    if report.runtime:
        r = report.runtime
        console.print(
            f"ONNX Runtime on {r['device']} runs {r['integer_kernels']} integer kernels and {r['float_compute']} float "
            f"Conv/MatMul/Gemm ({r['integer_weight_share']:.0%} of weights in integer kernels); unfused Q/DQ: "
            f"{r['unfused_quantize']}/{r['unfused_dequantize']}"
        )
        for warning in r["warnings"]:
            console.print(f"[yellow]warning[/yellow]: {warning}")
    if report.verification:
        render_verification(console, report.verification)
    for warning in outcome_warnings(report):
        console.print(f"[bold yellow]warning[/bold yellow]: {warning}", soft_wrap=True)


def render_verification(console: Console, result: VerifyResult) -> None:
    if not result.budget:  # nothing was checked: a PASSED here would be a silent success
        status = "[yellow]NOT CHECKED[/yellow] (no budget: the metrics below are reported, not judged)"
    else:
        status = f"{'[green]PASSED[/green]' if result.passed else '[red]FAILED[/red]'} (budget: {result.budget})"
    table = Table(title=f"verification on {result.device}, {result.samples} samples: {status}", title_justify="left")
    for column in ("output", "max abs", "rel L2", "cosine mean", "cosine min", "top-1", "decisions"):
        table.add_column(column, justify="left" if column == "output" else "right")
    for o in result.outputs:
        table.add_row(
            o.name,
            f"{o.max_abs:.3g}",
            f"{o.rel_l2:.3g}",
            f"{o.cosine_mean:.6f}",
            f"{o.cosine_min:.6f}",
            f"{o.top1:.4f}" if o.top1 is not None else "–",
            f"{o.decisions:.4f}" if o.decisions is not None else "–",
        )
    console.print(table)
    for line in filter(None, map(token_summary, result.outputs)):
        console.print(line, soft_wrap=True)
    for violation in result.violations:
        console.print(f"[red]over budget[/red]: {violation}")


def render_stats(console: Console, name: str, stats: ModelStats, extra: dict[str, str]) -> None:
    console.print(f"[bold]{name}[/bold]")
    opsets = ", ".join(f"{d or 'ai.onnx'}:{v}" for d, v in stats.opsets.items())
    console.print(f"IR {stats.ir_version}, opsets {opsets}")
    console.print(
        f"{stats.nodes} nodes, {stats.parameters:,} parameters, {_mib(stats.bytes)} of weights"
        f" ({_mib(stats.external_bytes)} external), {stats.functions} functions, {stats.subgraphs} subgraphs"
    )
    if stats.sparsity is not None:
        console.print(f"sparsity of float weights: {stats.sparsity:.1%}; Q/DQ pairs: {stats.qdq_pairs}")
    for key, value in extra.items():
        console.print(f"{key}: {value}")
    dtypes = Table(title="weights by dtype", title_justify="left")
    for column in ("dtype", "parameters", "bytes"):
        dtypes.add_column(column, justify="left" if column == "dtype" else "right")
    for dtype, size in sorted(stats.bytes_by_dtype.items(), key=lambda kv: -kv[1]):
        dtypes.add_row(dtype, f"{stats.params_by_dtype[dtype]:,}", _mib(size))
    console.print(dtypes)
    ops = Table(title="ops", title_justify="left")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in stats.ops.items():
        ops.add_row(op, str(count))
    console.print(ops)
