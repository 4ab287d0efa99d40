"""The corpus bench's rows, summarised for the README: totals per job, one line per model.

python bench/corpus_summary.py results.json [more.json ...]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Row = dict[str, Any]
EXACT_REL_L2 = 1e-6
LOSSY = ("default", "quantize", "weight_only", "fp16", "prune24", "prune_structured")
ORT = ("ort_s8", "ort_u8", "ort_u8_ops")


def _ok(row: Row) -> bool:
    return "error" not in row and bool(row.get("valid"))


def _exact(row: Row, key: str = "rel_l2") -> bool:
    """Valid and measured equal to fp32; a row without a measured rel L2 is not counted as exact. ``key``
    "rel_l2_deployed": with ORT's default graph rewrites on for both models, as they are deployed."""
    return _ok(row) and row.get(key) is not None and row[key] <= EXACT_REL_L2


def totals(rows: list[Row]) -> str:
    """Per job: how many models loaded, ran and came out valid; exactness or goals met."""
    lines = [
        "| job | models | loaded | ran | valid | exact (rel L2 ≤ 1e-6) / task goal met | latency ≤ fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key in dict.fromkeys(r["key"] for r in rows):
        group = [r for r in rows if r["key"] == key]
        if group[0]["section"] == "fold":
            good = sum(1 for r in group if _exact(r))
        else:
            good = sum(1 for r in group if _ok(r) and r.get("score") is not None and r["score"] >= r["goal"])
        fast = sum(1 for r in group if _ok(r) and r.get("latency_ratio") is not None and r["latency_ratio"] <= 1.0)
        lines.append(
            f"| {group[0]['tool']} | {len(group)} | {sum(bool(r.get('loaded')) for r in group)} "
            f"| {sum(bool(r.get('ran')) for r in group)} | {sum(_ok(r) for r in group)} | {good} | {fast} |"
        )
    return "\n".join(lines)


def fold_parity(rows: list[Row]) -> str:
    """fold against the better of onnxslim and onnxsim: nodes, wall time, exactness (valid outputs only)."""
    by = {(r["model"], r["key"]): r for r in rows if r["section"] == "fold"}
    models = list(dict.fromkeys(r["model"] for r in rows if r["key"] == "fold"))
    nodes = fewer = time_met = timed = exact = deployed = measured = 0
    for model in models:
        fold = by.get((model, "fold"))
        peers = [by[(model, k)] for k in ("onnxslim", "onnxsim") if (model, k) in by and _ok(by[(model, k)])]
        if fold is None or not _ok(fold):
            continue
        exact += _exact(fold)
        measured += fold.get("rel_l2_deployed") is not None
        deployed += _exact(fold, "rel_l2_deployed")
        if peers:
            best = min(p["nodes_out"] for p in peers)
            nodes += fold["nodes_out"] <= best
            fewer += fold["nodes_out"] < best
        slim = by.get((model, "onnxslim"))
        if slim is not None and _ok(slim) and slim.get("seconds") and fold.get("seconds"):
            timed += 1
            time_met += fold["seconds"] <= slim["seconds"]
    return (
        "| fold on the corpus | models |\n|---|---:|\n"
        f"| nodes ≤ min(onnxslim, onnxsim) | {nodes} of {len(models)} ({fewer} strictly fewer) |\n"
        f"| outputs equal (rel L2 ≤ 1e-6), ORT's graph rewrites off | {exact} of {len(models)} |\n"
        + (
            f"| outputs equal (rel L2 ≤ 1e-6), ORT's default rewrites on for both (as deployed) | {deployed} of "
            f"{measured} |\n"
            if measured
            else ""
        )
        + f"| wall time ≤ onnxslim's (file to file) | {time_met} of {timed} |"
    )


def _cell(row: Row | None) -> str:
    if row is None:
        return "–"
    if not _ok(row):
        return "✗ " + str(row.get("error", "invalid")).split(":")[0]
    score = row.get("score")
    mark = "" if score is None else ("✓" if score >= row["goal"] else "✗")
    latency = row.get("latency_ratio")
    return f"{score:.3f}{mark} {latency:.2f}×" if score is not None and latency is not None else "ok"


def per_model(rows: list[Row]) -> str:
    """One line per model: fold node counts beside onnxslim/onnxsim, each lossy job's metric and latency ratio."""
    lines = [
        "| model | metric (goal) | fold nodes: graphopt / onnxslim / onnxsim | default | quantize | weight_only "
        "| fp16 | prune 2:4 | prune_structured | best ORT QDQ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["key"]: r for r in rows if r["model"] == model}
        nodes = " / ".join(
            str(mine[k].get("nodes_out", "✗")) if k in mine else "–" for k in ("fold", "onnxslim", "onnxsim")
        )
        ort = [mine[k] for k in ORT if k in mine and _ok(mine[k]) and mine[k].get("score") is not None]
        best = max(ort, key=lambda r: (r["score"] >= r["goal"], -(r.get("latency_ratio") or 9e9)), default=None)
        first = next(iter(mine.values()))
        lines.append(
            f"| {model} | {first['metric']} ({first['goal']:g}) | {nodes} | "
            + " | ".join(_cell(mine.get(k)) for k in LOSSY)
            + f" | {_cell(best) if best else '✗ none valid'}{' (' + best['tool'][8:] + ')' if best else ''} |"
        )
    return "\n".join(lines)


def default_job(rows: list[Row]) -> str:
    """Issue 14's goal per model: the default job meets the task goal and runs no slower than the fastest
    valid ORT QDQ variant (or than fp32 where every ORT variant is slower); what the latency budget did."""
    lines = [
        "| model | metric (goal) | default: score | default: latency | fastest ORT QDQ (its score) | latency goal "
        "| accuracy met | latency met | vs fastest ORT within its goal | latency budget |",
        "|---|---|---:|---:|---:|---:|:---:|:---:|:---:|---|",
    ]
    met_both = met_accuracy = met_latency = met_fair = 0
    models = list(dict.fromkeys(r["model"] for r in rows if r["key"] == "default"))
    for model in models:
        mine = {r["key"]: r for r in rows if r["model"] == model}
        row = mine["default"]
        ort = [mine[k] for k in ORT if k in mine and _ok(mine[k]) and mine[k].get("latency_ratio") is not None]
        fastest = min(ort, key=lambda r: r["latency_ratio"], default=None)
        goal = min(1.0, fastest["latency_ratio"]) if fastest else 1.0
        if not _ok(row) or row.get("score") is None:
            lines.append(f"| {model} | {row['metric']} ({row['goal']:g}) | ✗ {row.get('error', 'invalid')[:60]} |")
            continue
        accuracy = row["score"] >= row["goal"]
        latency = row["latency_ratio"] <= goal
        # the same, against ORT variants that keep the task goal (an int8 model that breaks the task is no rival)
        good = [r for r in ort if r.get("score") is not None and r["score"] >= r["goal"]]
        fair_goal = min([1.0] + [r["latency_ratio"] for r in good])
        fair = accuracy and row["latency_ratio"] <= fair_goal
        met_accuracy += accuracy
        met_latency += latency
        met_both += accuracy and latency
        met_fair += fair
        ort_text = f"{fastest['latency_ratio']:.2f}× ({fastest['score']:.3f})" if fastest else "none valid"
        lines.append(
            f"| {model} | {row['metric']} ({row['goal']:g}) | {row['score']:.4f} | {row['latency_ratio']:.2f}× "
            f"| {ort_text} | ≤ {goal:.2f}× | {'✓' if accuracy else '✗'} | {'✓' if latency else '✗'} "
            f"| {'✓' if fair else '✗'} (≤ {fair_goal:.2f}×) | {row.get('note', '')} |"
        )
    lines.append(
        f"\nDefault job on {len(models)} models: task goal met on {met_accuracy}, latency goal met on {met_latency}, "
        f"both on {met_both}; task goal and latency ≤ the fastest ORT variant that keeps the task goal (else fp32) on "
        f"{met_fair}."
    )
    return "\n".join(lines)


def rounding(rows: list[Row]) -> str:
    """quantize with GPTQ's rounding and SmoothQuant (the defaults) against each turned off (task metric and
    latency), and its file-to-file time and memory without verification against ORT quantize_static's (uint8
    activations, valid outputs only) on the same calibration samples."""
    lines = [
        "| model | metric (goal) | rounding=nearest | smooth=false | quantize (both on) | quantize s, no verify "
        "| ORT QDQ u8 s | time / ORT's | peak RSS MB: quantize / ORT |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    better = worse = met_nearest = met_gptq = met_plain = cheap = timed = lean = 0
    models = list(dict.fromkeys(r["model"] for r in rows if r["key"] == "quantize_nearest"))
    for model in models:
        mine = {r["key"]: r for r in rows if r["model"] == model}
        near, gptq, ort = mine.get("quantize_nearest"), mine.get("quantize"), mine.get("ort_u8")
        cost = mine.get("quantize_noverify")  # file to file like ORT's: without graphopt's verification
        ort = ort if ort and _ok(ort) else None
        if not (near and gptq and _ok(near) and _ok(gptq)) or near.get("score") is None or gptq.get("score") is None:
            lines.append(
                f"| {model} | | {_cell(near)} | {_cell(mine.get('quantize_nosmooth'))} | {_cell(gptq)} | | | | |"
            )
            continue
        plain = mine.get("quantize_nosmooth")
        met_plain += bool(plain and _ok(plain) and plain.get("score") is not None and plain["score"] >= plain["goal"])
        better += gptq["score"] > near["score"]
        worse += gptq["score"] < near["score"]
        met_nearest += near["score"] >= near["goal"]
        met_gptq += gptq["score"] >= gptq["goal"]
        ratio, cost_seconds = "", "–"
        if cost and _ok(cost) and cost.get("seconds"):
            cost_seconds = f"{cost['seconds']:.1f}"
            if ort and ort.get("seconds"):
                ratio = f"{cost['seconds'] / ort['seconds']:.2f}×"
                timed += 1
                cheap += cost["seconds"] <= 0.5 * ort["seconds"]
        ort_seconds = f"{ort['seconds']:.1f}" if ort and ort.get("seconds") else "–"
        rss = "–"
        # rows of runs before the peak was reset per job carry the inputs' loading: not comparable
        if ort and cost and cost.get("rss_reset") and ort.get("rss_reset"):
            # above what the job's process held before the tool ran (interpreter, inputs)
            mine_mb = cost["peak_rss_mb"] - cost["rss_before_mb"]
            ort_mb = ort["peak_rss_mb"] - ort["rss_before_mb"]
            rss = f"{mine_mb:.0f} / {ort_mb:.0f}"
            lean += mine_mb <= 0.5 * ort_mb
        lines.append(
            f"| {model} | {gptq['metric']} ({gptq['goal']:g}) | {_cell(near)} | {_cell(mine.get('quantize_nosmooth'))} "
            f"| {_cell(gptq)} "
            f"| {cost_seconds} | {ort_seconds} | {ratio} | {rss} |"
        )
    lines.append(
        f"\nquantize against rounding=nearest on {len(models)} models: task metric higher on {better}, lower on "
        f"{worse}; task goal met on {met_gptq} (round-to-nearest: {met_nearest}, without SmoothQuant: {met_plain}); "
        f"quantize time ≤ 0.5× ORT quantize_static's on {cheap} of {timed}, peak RSS (above the process before "
        f"the tool) ≤ 0.5× ORT's on {lean}."
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="JSON written by bench_corpus.py --out")
    args = parser.parse_args(argv)
    rows = [row for path in args.results for row in json.loads(path.read_text())["rows"]]
    parts = [totals(rows), fold_parity(rows), per_model(rows), default_job(rows)]
    if any(r["key"] == "quantize_nearest" for r in rows):
        parts.append(rounding(rows))
    print("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
