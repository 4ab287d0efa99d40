"""The optimization report: per pass and overall, as a dict/JSON and as Markdown."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from graphopt.budget import token_summary
from graphopt.runtime import Latency
from graphopt.speed import summary
from graphopt.stats import ModelStats
from graphopt.verify import VerifyResult

SCHEMA_VERSION = 1


@dataclass
class PassRecord:
    """What one pass did: time, whether it changed the model, and the model before/after."""

    name: str
    options: dict[str, Any]
    seconds: float
    modified: bool
    exact: bool
    before: ModelStats
    after: ModelStats
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": self.options,
            "seconds": self.seconds,
            "modified": self.modified,
            "exact": self.exact,
            "nodes": [self.before.nodes, self.after.nodes],
            "parameters": [self.before.parameters, self.after.parameters],
            "bytes": [self.before.bytes, self.after.bytes],
            "details": self.details,
        }


@dataclass
class Report:
    """Everything the pipeline measured, from input to verified output."""

    input_path: str | None
    device: str
    passes: list[PassRecord]
    before: ModelStats
    after: ModelStats
    verification: VerifyResult | None = None
    latency: dict[str, Latency] | None = None
    latency_inputs: dict[str, list[int]] | None = None  # the input shapes latency was measured with
    decode_latency: dict[str, Latency] | None = None  # a decoder's one-token step with the prompt's KV cache
    output_path: str | None = None
    output_bytes_on_disk: int | None = None
    fallback: dict[str, Any] | None = None
    speed: dict[str, Any] | None = None  # the latency budget's search (graphopt.speed.SpeedResult)
    target: dict[str, Any] | None = None  # the built-in target run: its name, the CPU found, what it chose
    data: dict[str, str] | None = None  # the inputs each step used ("calibration", "verification", "note")
    runtime: dict[str, Any] | None = None
    layers: list[dict[str, Any]] | None = None
    opset: dict[str, Any] | None = None  # the opset conversion before the passes, when one was wanted
    lifted_constants: int = 0  # weights in Constant nodes or Identity copies, made initializers before the lossy passes

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "input": self.input_path,
            "output": self.output_path,
            "output_bytes_on_disk": self.output_bytes_on_disk,
            "device": self.device,
            "passes": [p.to_dict() for p in self.passes],
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "verification": self.verification.to_dict() if self.verification else None,
            "latency": {k: v.to_dict() for k, v in self.latency.items()} if self.latency else None,
            "latency_inputs": self.latency_inputs,
            "decode_latency": {k: v.to_dict() for k, v in self.decode_latency.items()} if self.decode_latency else None,
            "fallback": self.fallback,
            "speed": self.speed,
            "target": self.target,
            "data": self.data,
            "warnings": outcome_warnings(self),
            "runtime": self.runtime,
            "layers": self.layers,
            "opset": self.opset,
            "lifted_constants": self.lifted_constants,
        }

    def to_json(self) -> str:
        """Standard JSON: a non-finite number (an unbounded budget ratio, a NaN metric) is written as a string."""
        return json.dumps(_finite(self.to_dict()), indent=2, default=str, allow_nan=False)

    def to_markdown(self) -> str:
        lines = [f"# graphopt report: {self.input_path or 'model'}", ""]
        lines += ["| pass | time (s) | changed | nodes | parameters | bytes |", "|---|---:|---|---:|---:|---:|"]
        for p in self.passes:
            lines.append(
                f"| {p.name} | {p.seconds:.3f} | {'yes' if p.modified else 'no'} | {p.before.nodes} → {p.after.nodes} "
                f"| {p.before.parameters:,} → {p.after.parameters:,} | {p.before.bytes:,} → {p.after.bytes:,} |"
            )
        lines += [
            "",
            f"Model: {self.before.nodes} → {self.after.nodes} nodes, "
            f"{self.before.bytes:,} → {self.after.bytes:,} bytes of weights.",
            "",
        ]
        if self.target:
            t = self.target
            lines += [f"Target `{t['name']}` on {t['cpu']}:", *[f"- {c}" for c in t["choices"]], ""]
        if self.data:
            lines += [f"Data: {step}: {text}." for step, text in self.data.items()] + [""]
        if self.lifted_constants:
            lines += [
                f"{self.lifted_constants} weights stored as Constant nodes or read through Identity copies became "
                "initializers read directly.",
                "",
            ]
        if self.opset:
            o = self.opset
            lines += [f"Opset: {o['before']} → {o['after']} (wanted {o['wanted']}): {o['reason']}.", ""]
        if self.latency:
            line = latency_line(self)
            lines += [line[:1].upper() + line[1:] + ".", ""]
        if self.decode_latency:
            lines += [decode_line(self.decode_latency), ""]
        if self.fallback:
            f = self.fallback
            changed = ", ".join(f"{k}={v}" for k, v in (f.get("changed") or {}).items())
            if f.get("dropped"):
                text = (
                    f"Accuracy fallback on `{f['pass_name']}` (score {f['score_before']:.3g} → {f['score_after']:.3g}, "
                    f"≤ 1 is within): {fallback_outcome(f)}."
                )
            else:
                text = (
                    f"Accuracy fallback on `{f['pass_name']}`: {'reached' if f['passed'] else 'did not reach'} the "
                    f"budget (score {f['score_before']:.3g} → {f['score_after']:.3g}, ≤ 1 is within) after "
                    f"{f['trials']} trials; "
                    + (f"options changed: {changed}; " if changed else "")
                    + fallback_outcome(f)
                    + "."
                )
            lines += [text, ""]
        if self.speed:
            text = summary(self.speed)
            lines += [text[0].upper() + text[1:] + ".", ""]
        if self.runtime:
            r = self.runtime
            lines += [
                f"What ONNX Runtime runs on {r['device']} ({', '.join(r['providers'])}): "
                f"{r['integer_kernels']} integer kernels, {r['float_compute']} float Conv/MatMul/Gemm, "
                f"{r['integer_weight_share']:.0%} of weights in integer kernels, {r['unfused_quantize']} "
                f"QuantizeLinear and {r['unfused_dequantize']} DequantizeLinear left unfused.",
                *[f"- warning: {w}" for w in r["warnings"]],
                "",
            ]
        if self.layers:
            lines += ["Worst layers (candidate vs reference, by SQNR):", "", "| tensor | op | SQNR dB | rel L2 |"]
            lines += ["|---|---|---:|---:|"]
            lines += [
                f"| {e['tensor']} | {e['op_type']} | {e['sqnr_db']:.1f} | {e['rel_l2']:.3g} |" for e in self.layers[:10]
            ]
            lines.append("")
        if self.verification:
            v = self.verification
            verdict = (
                ("PASSED" if v.passed else "FAILED") + f" (budget: {v.budget})"
                if v.budget
                else "NOT CHECKED (no budget)"
            )
            lines += [f"Verification on {v.device}, {v.samples} samples: {verdict}", ""]
            lines += [
                "| output | max abs | rel L2 | cosine mean | cosine min | top-1 | decisions |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for o in v.outputs:
                top1 = f"{o.top1:.4f}" if o.top1 is not None else "–"
                decisions = f"{o.decisions:.4f}" if o.decisions is not None else "–"
                lines.append(
                    f"| {o.name} | {o.max_abs:.3g} | {o.rel_l2:.3g} | {o.cosine_mean:.6f} "
                    f"| {o.cosine_min:.6f} | {top1} | {decisions} |"
                )
            lines += [f"- {line}" for line in filter(None, map(token_summary, v.outputs))]
            lines += [f"- {violation}" for violation in v.violations]
        warnings = outcome_warnings(self)
        if warnings:
            lines += ["", "Warnings:", "", *[f"- {w}" for w in warnings]]
        return "\n".join(lines) + "\n"


def _finite(value: Any) -> Any:
    """``value`` with every float that is infinite or NaN replaced by its name ("inf", "-inf", "nan")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


# A candidate measured this much slower than its input is reported as slower (interleaved medians
# of sub-millisecond models vary by a few percent between identical runs).
_SLOWER = 1.05
# Lossy passes that leave more than this share of the weight bytes compressed little.
_LITTLE = 0.9


def _reason(skipped: object) -> str:
    """A pass's skip reason: a sentence, or reasons with how many nodes each left alone."""
    if isinstance(skipped, dict):
        return ", ".join(f"{reason} ({count})" for reason, count in skipped.items())
    return str(skipped)


def outcome_warnings(report: Report) -> list[str]:
    """What a run that exits 0 did not achieve: nothing compressed, or an output slower than its input.

    Printed by the CLI and written into the JSON and Markdown reports, so a pipeline that reads
    only the files sees them too.
    """
    warnings = []
    lossy = [p for p in report.passes if not p.exact]
    if lossy and not any(p.modified for p in lossy):
        reasons = "; ".join(f"{p.name}: {_reason(p.details['skipped'])}" for p in lossy if p.details.get("skipped"))
        warnings.append(
            f"nothing was compressed: no lossy pass ({', '.join(p.name for p in lossy)}) changed the model"
            + (f" ({reasons})" if reasons else "")
            + "; the output computes what the input does."
        )
    elif (
        lossy
        and report.before.bytes
        and report.after.bytes > _LITTLE * report.before.bytes
        and (report.after.sparsity or 0.0) <= (report.before.sparsity or 0.0) + 0.05  # pruning keeps bytes, adds zeros
    ):
        dynamic = [p.name for p in lossy if p.details.get("mode") == "dynamic"]
        warnings.append(
            f"little was compressed: weights {report.before.bytes:,} B → {report.after.bytes:,} B "
            f"({1 - report.after.bytes / report.before.bytes:.0%} smaller)"
            + (
                f"; {', '.join(dynamic)} ran in dynamic mode (no calibration data), which takes MatMuls only: "
                "give --calib DATA for the convolutions"
                if dynamic
                else ""
            )
            + "."
        )
    fallback = report.fallback
    if fallback and fallback.get("float_nodes") and lossy and report.after.bytes >= report.before.bytes:
        warnings.append(
            f"the accuracy fallback left {len(fallback['float_nodes'])} nodes {fallback.get('kept', 'in float')} "
            "and the weights are no smaller than the input's: loosen the budget or try another pass."
        )
    scored = [o.name for o in report.verification.outputs if o.tokens] if report.verification else []
    if scored and (report.data or {}).get("verification", "").startswith("seeded random"):
        warnings.append(
            f"the perplexity of {', '.join(scored)} was measured on random token ids, not text: give token windows "
            "(--calib or --verify-data) for a perplexity that says how the model reads language."
        )
    if report.latency and any(p.modified for p in report.passes):  # an unchanged model differs only by noise
        ratio = report.latency["optimized"].median_ms / report.latency["reference"].median_ms
        decode = report.decode_latency
        step = decode["optimized"].median_ms / decode["reference"].median_ms if decode else None
        if ratio > _SLOWER:
            warnings.append(
                f"the output runs {ratio:.2f}× slower than the input on {report.device} (median of interleaved runs)"
                + (f" on the verification prompt; a decode step runs at {step:.2f}× the input's time" if step else "")
                + "; see the ONNX Runtime line above for kernels that did not fuse."
            )
        elif step is not None and step > _SLOWER:
            warnings.append(f"a decode step of the output runs {step:.2f}× slower than the input's.")
    return warnings


def fallback_outcome(fallback: dict[str, Any]) -> str:
    """What the accuracy fallback left: the step dropped (whatever the search found, the whole pipeline did not hold
    the budget with it), the layers it kept in float, or that no set of them within its limits held the budget."""
    kept = fallback.get("kept", "in float")
    if fallback.get("dropped"):
        dropped = ", ".join(fallback["dropped"])
        return f"no placement held the budget after {fallback['trials']} trials; dropped: {dropped}"
    if fallback["passed"] or fallback["float_nodes"]:
        return f"nodes left {kept}: {', '.join(fallback['float_nodes']) or 'none'}"
    return f"no set of nodes left {kept} within its limits held it"


def latency_line(report: Report) -> str:
    """One line on the output's latency against the input's (the first verification batch)."""
    ref, opt = report.latency["reference"], report.latency["optimized"]  # type: ignore[index]
    shapes = ", ".join(f"{k}{v}" for k, v in (report.latency_inputs or {}).items())
    return (
        f"latency on {report.device} (inputs {shapes}; median of {opt.runs} interleaved runs): "
        f"{ref.median_ms:.3f} ms → {opt.median_ms:.3f} ms ({opt.median_ms / ref.median_ms:.2f}×)"
    )


def decode_line(decode: dict[str, Latency]) -> str:
    """One line on a decoder's one-token step (the prompt's KV cache fed back)."""
    ref, opt = decode["reference"], decode["optimized"]
    return (
        f"Decode step (1 token after the verification prompt's KV cache; median of {opt.runs}, interleaved): "
        f"{ref.median_ms:.3f} ms → {opt.median_ms:.3f} ms ({opt.median_ms / ref.median_ms:.2f}×)."
    )
