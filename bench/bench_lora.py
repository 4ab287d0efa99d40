"""merge_lora against PEFT's own merge, on the zoo transformer and all-MiniLM-L6-v2.

Each case is a real ``peft.get_peft_model`` LoRA (nonzero random B) exported three ways
(``models/peft_zoo.py``, cached in ``.cache/lora/``): with its LoRA branches, after PEFT's
``merge_and_unload()`` (the reference), and the base model without LoRA. graphopt merges

- ``in-graph``: the branches of the LoRA export;
- ``adapter``: the ``save_pretrained`` adapter folder into the base export.

Reported per row: nodes of the merged graph against the base graph, the merge pass's time
(median of ``--repeats``), the largest output error against PEFT's merged export relative
to max|y| (fp32, ONNX Runtime CPU), and ONNX Runtime CPU latency (1 thread, sessions run
interleaved, medians; batch 16 × seq 32 for the transformer, 4 sentences for MiniLM) of
the base, merged and unmerged models; the ratios are medians of per-round ratios, each round
running the three models back to back.

    python bench/bench_lora.py [--cases transformer,minilm] [--exporters dynamo,torchscript] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from graphopt import io, runtime
from graphopt.passes.lora.merge import MergeLoraConfig, MergeLoraPass
from models import peft_zoo

CASES = {"transformer": peft_zoo.transformer_case, "minilm": peft_zoo.minilm_case}
# Latency batch and runs per case: MiniLM takes ~50 ms a batch of 4 on one thread, the transformer ~1 ms.
LATENCY = {"transformer": (16, 1.0), "minilm": (4, 0.2)}


def _outputs(model: object, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return runtime.run(runtime.create_session(model, threads=1), feeds)  # type: ignore[arg-type]


def _relative_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(got[k] - v).max() / np.abs(v).max()) for k, v in want.items())


def _merge(source: Path, config: MergeLoraConfig, repeats: int) -> tuple[object, float, dict[str, object]]:
    """(merged model, median pass seconds, details); each repeat merges a freshly loaded model."""
    seconds, model, merge = [], None, None
    for _ in range(repeats):
        model = io.load_model(source)
        merge = MergeLoraPass(config)
        start = time.perf_counter()
        merge(model)
        seconds.append(time.perf_counter() - start)
    assert model is not None and merge is not None
    return model, statistics.median(seconds), merge.details


def paired_latency(
    sessions: dict[str, object], feeds: dict[str, np.ndarray], runs: int, warmup: int = 20
) -> tuple[dict[str, float], dict[str, float]]:
    """(median ms per session, median per-round ratio to "base") with the sessions run in rotating order.

    Each round runs every session once, back to back, so a slow moment of a shared machine
    hits one round of all sessions; the ratios are taken within a round before the median.
    """
    names = list(sessions)
    for _ in range(warmup):
        for session in sessions.values():
            session.run(None, feeds)  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(runs):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            start = time.perf_counter()
            sessions[name].run(None, feeds)  # type: ignore[attr-defined]
            times[name].append((time.perf_counter() - start) * 1e3)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {
        name: statistics.median(t / b for t, b in zip(values, times["base"], strict=True))
        for name, values in times.items()
    }
    return medians, ratios


def bench_case(name: str, exporter: str, repeats: int, runs: int) -> list[dict[str, object]]:
    case = CASES[name](exporter)
    feeds = peft_zoo.eval_feeds(name)
    feeds = {k: v[:16] for k, v in feeds.items()}
    reference = _outputs(io.load_model(case.merged), feeds)
    base, unmerged = io.load_model(case.base), io.load_model(case.lora)
    modes = {
        "in-graph": (case.lora, MergeLoraConfig()),
        "adapter": (case.base, MergeLoraConfig(adapters=(str(case.adapter),))),
    }
    rows = []
    for mode, (source, config) in modes.items():
        merged, seconds, details = _merge(source, config, repeats)
        sessions = {
            label: runtime.create_session(model, threads=1)
            for label, model in (("base", base), ("merged", merged), ("unmerged", unmerged))
        }
        batch, share = LATENCY[name]
        timed = {k: v[:batch] for k, v in feeds.items()}
        medians, ratios = paired_latency(sessions, timed, max(10, int(runs * share)))
        rows.append(
            {
                "case": name,
                "exporter": exporter,
                "mode": mode,
                "nodes_unmerged": len(list(unmerged.graph)),
                "nodes_merged": len(list(merged.graph)),  # type: ignore[attr-defined]
                "nodes_base": len(list(base.graph)),
                "lora_merged": sum((details.get("branches_merged") or details.get("modules_merged") or {}).values()),  # type: ignore[union-attr]
                "merge_seconds": seconds,
                "rel_error_vs_peft": _relative_error(_outputs(merged, feeds), reference),
                **{f"{label}_ms": value for label, value in medians.items()},
                "merged_over_base": ratios["merged"],
                "speedup_vs_unmerged": ratios["unmerged"] / ratios["merged"],
            }
        )
    return rows


def to_markdown(rows: list[dict[str, object]]) -> str:
    lines = [
        "| model | exporter | merge | LoRA merged | nodes unmerged → merged (base) | merge time (s) "
        "| max err / max\\|y\\| vs PEFT merge | latency base / merged / unmerged (ms) | merged / base | speedup |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['exporter']} | {r['mode']} | {r['lora_merged']} "
            f"| {r['nodes_unmerged']} → {r['nodes_merged']} ({r['nodes_base']}) | {r['merge_seconds']:.3f} "
            f"| {r['rel_error_vs_peft']:.1e} | {r['base_ms']:.2f} / {r['merged_ms']:.2f} / {r['unmerged_ms']:.2f} "
            f"| {r['merged_over_base']:.3f} | {r['speedup_vs_unmerged']:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="transformer,minilm")
    parser.add_argument("--exporters", default="dynamo,torchscript")
    parser.add_argument("--repeats", type=int, default=3, help="merges timed per row (median)")
    parser.add_argument("--runs", type=int, default=500, help="latency rounds (MiniLM: a fifth)")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    rows: list[dict[str, object]] = []
    for name in args.cases.split(","):
        for exporter in args.exporters.split(","):
            if name == "minilm" and exporter == "torchscript":
                continue  # one exporter is enough for the timing figure; both are covered on the transformer
            rows.extend(bench_case(name, exporter, args.repeats, args.runs))
    print(to_markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    failures = [r for r in rows if r["rel_error_vs_peft"] > 1e-5 or r["nodes_merged"] != r["nodes_base"]]  # type: ignore[operator]
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
