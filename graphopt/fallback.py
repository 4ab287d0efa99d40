"""Accuracy budget fallback: keep the fewest, most sensitive layers in float until the budget holds.

When the optimized model is over budget, the last lossy pass that can exclude nodes
(``quantize``, ``weight_only``, pruning) is re-run from the model as it was before it,
with the statistics it already collected:

1. sensitivity: each candidate layer (Conv/MatMul/Gemm/Gather) alone is left in float and
   the end-to-end budget score is measured; layers are ranked by how much that helps;
2. search: the shortest prefix of that ranking within budget (doubling, then bisection);
   if none, greedy: the remaining layer that helps most is left in float, gains being
   re-measured after each choice, until the budget holds;
3. pruning: each chosen layer is put back (least helpful first) if the budget still holds;
4. speed: among the sets of that size that met the budget during the search (often several
   single layers do), the fastest in ONNX Runtime wins: a float attention product costs far
   less than a float FFN projection.

The search stops at ``fallback.max_seconds``: then the smallest set that met the budget so
far is taken (the report says the search was cut short), or none.

Exact passes after the lossy one cannot change accuracy, so trials skip them; the
pipeline re-runs them once on the final model.
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

from graphopt import registry, stats
from graphopt.errors import DataError
from graphopt.recipe import FallbackSettings

logger = logging.getLogger(__name__)

CANDIDATE_OPS = ("Conv", "MatMul", "Gemm", "Gather")
Latency = Callable[[list[ir.Model]], list[float]]  # median ms of each model


@dataclass
class FallbackResult:
    """What the search found and what it cost."""

    pass_name: str
    kept: str = "in float"  # the pass's own word for a node it left alone ("dense" for pruning)
    float_nodes: list[str] = field(default_factory=list)
    passed: bool = False
    trials: int = 0
    score_before: float = math.inf
    score_after: float = math.inf
    sensitivity: dict[str, float] = field(default_factory=dict)
    # median latency (ms) of each equally small set within budget that was timed, by its layers
    timed: dict[str, float] = field(default_factory=dict)
    # budget score of each re-calibrated alternative (e.g. {"method=mse": 1.2}), and the one kept
    alternatives: dict[str, float] = field(default_factory=dict)
    changed: dict[str, Any] = field(default_factory=dict)
    stopped: str = ""  # why the search ended early (its time limit), or empty

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass
class _Search:
    """One fallback search over a lossy step of a pipeline."""

    spec: registry.PassSpec
    config: Any
    before: ir.Model
    statistics: Any
    evaluate: Callable[[ir.Model], float]
    result: FallbackResult
    deadline: float = math.inf  # time.monotonic() past which no new trial starts
    scores: dict[tuple[str, ...], float] = field(default_factory=dict)

    def build(self, excluded: Sequence[str]) -> ir.Model:
        model = self.before.clone()
        self.spec.apply(model, self.spec.with_excluded(self.config, excluded), self.statistics)
        return model

    def score(self, excluded: Sequence[str]) -> float:
        """The budget score with ``excluded`` left as they are; a set already tried is not run again."""
        key = tuple(excluded)
        if key not in self.scores:
            if time.monotonic() > self.deadline:
                raise _OutOfTime
            self.result.trials += 1
            self.scores[key] = self.evaluate(self.build(excluded))
        return self.scores[key]

    def fastest(self, chosen: list[str], latency: Latency | None, limit: int) -> list[str]:
        """The fastest of the sets as small as ``chosen`` that met the budget (``chosen`` first)."""
        ties = {frozenset(chosen): list(chosen)}
        for excluded, score in self.scores.items():
            if score <= 1.0 and len(set(excluded)) == len(chosen):
                ties.setdefault(frozenset(excluded), list(excluded))
        if latency is None or len(ties) < 2 or limit < 2:
            return chosen
        sets = list(ties.values())[:limit]
        medians = latency([self.build(s) for s in sets])
        self.result.timed = {", ".join(s): round(ms, 4) for s, ms in zip(sets, medians, strict=True)}
        return sets[min(range(len(sets)), key=medians.__getitem__)]

    def best_so_far(self) -> list[str] | None:
        """The smallest set that met the budget among the trials run, lowest score first."""
        within = [(len(set(k)), score, list(k)) for k, score in self.scores.items() if score <= 1.0]
        return min(within)[2] if within else None

    def rank(self, candidates: Sequence[str], baseline: float) -> list[str]:
        gains = {}
        for name in candidates:
            score = self.score([name])
            gains[name] = baseline - score
        self.result.sensitivity = dict(sorted(gains.items(), key=lambda kv: -kv[1]))
        return list(self.result.sensitivity)  # most helpful first; interactions may rescue the rest

    def greedy(self, order: Sequence[str], baseline: float, limit: int, width: int) -> list[str] | None:
        """Add, one at a time, whichever of the ``width`` most sensitive remaining layers helps most.

        Layers interact (leaving one in float changes which neighbours stay integer), so
        gains are re-measured after each choice instead of summed from the first ranking.
        """
        chosen: list[str] = []
        score = baseline
        pool = list(order)
        while score > 1.0 and pool and len(chosen) < limit:
            trials = [(self.score([*chosen, name]), name) for name in pool[:width]]
            best_score, best = min(trials)
            if best_score >= score:
                return None
            chosen.append(best)
            pool.remove(best)
            score = best_score
        return chosen if score <= 1.0 else None

    def prefix(self, order: Sequence[str], limit: int) -> list[str] | None:
        """The shortest prefix of the ranking within budget: doubling, then bisection."""
        k, last_fail = 1, 0
        top = min(limit, len(order))
        while k <= top:
            if self.score(order[:k]) <= 1.0:
                while last_fail + 1 < k:
                    mid = (last_fail + k) // 2
                    if self.score(order[:mid]) <= 1.0:
                        k = mid
                    else:
                        last_fail = mid
                return list(order[:k])
            last_fail, k = k, (k * 2 if k * 2 <= top or k == top else top)
        return None

    def prune(self, chosen: list[str]) -> list[str]:
        for name in sorted(chosen, key=lambda n: self.result.sensitivity.get(n, 0.0)):
            rest = [n for n in chosen if n != name]
            if rest and self.score(rest) <= 1.0:
                chosen = rest
        return chosen


def search(
    spec: registry.PassSpec,
    config: Any,
    before: ir.Model,
    statistics: Any,
    evaluate: Callable[[ir.Model], float],
    baseline: float,
    settings: FallbackSettings,
    suspects: Sequence[str] = (),
    latency: Latency | None = None,
    recalibrate: Callable[[Any], Any] | None = None,
    produced: stats.ModelStats | None = None,
) -> tuple[FallbackResult, Any, Any]:
    """Find the fewest layers to keep in float so that ``evaluate`` scores <= 1.

    First, with ``recalibrate`` (config -> statistics), the pass's alternatives of equal
    speed (other calibration methods) are tried; the best becomes the starting point, and
    if it meets the budget nothing stays in float. Then the pass's wider configs (more
    layers at more bits, :meth:`registry.PassSpec.wider`), least first: the first within
    budget is kept. ``suspects`` (node names, worst first,
    e.g. from layer-wise SQNR) are tried first. ``latency`` (median ms of each model) picks
    the fastest of equally small solutions. ``produced`` (the step's output as the recipe
    configured it, with sparsity) is what an alternative must compress as well as. Returns
    the search's record (``passed`` when something within the limits met the budget) and
    the config and statistics to re-run the pass with.
    """
    result = FallbackResult(spec.name, spec.lossy.kept if spec.lossy else "in float", score_before=baseline)
    starts = [(config, statistics, baseline)]
    if recalibrate is not None and spec.alternatives(config):
        produced = produced or _produced(spec, config, before, statistics)
        better = _better_alternative(spec, config, before, produced, evaluate, baseline, recalibrate, result)
        if better is not None:
            alt_config, alt_statistics, alt_score = better
            if alt_score <= 1.0:
                result.score_after, result.passed = alt_score, True
                result.changed = _changes(config, alt_config)
                return result, alt_config, alt_statistics
            # Float layers on top of the better ranges first; the original ranges if that fails.
            starts.insert(0, (alt_config, alt_statistics, alt_score))
    deadline = time.monotonic() + settings.max_seconds
    wider = None
    if spec.wider(starts[0][0]):
        produced = produced or _produced(spec, config, before, statistics)
        wider = _wider(spec, starts[0][0], starts[0][1], before, produced, evaluate, result, deadline)
    if wider is not None:
        result.changed = _changes(config, wider)
        return result, wider, starts[0][1]
    for start_config, start_statistics, start_score in starts:
        state = _Search(spec, start_config, before, start_statistics, evaluate, result, deadline)
        try:
            chosen = _float_layers(state, before, suspects, start_score, settings)
            if chosen is not None:
                chosen = state.fastest(state.prune(chosen), latency, settings.timed)
        except _OutOfTime:
            result.stopped = (
                f"time limit of {settings.max_seconds:g} s (fallback.max_seconds) after {result.trials} trials"
            )
            logger.warning("fallback: search stopped at its %s", result.stopped)
            chosen = state.best_so_far()
            if chosen is None:
                break
        if chosen is not None:
            score = state.score(chosen)
            result.float_nodes, result.score_after, result.passed = chosen, score, score <= 1.0
            result.changed = _changes(config, start_config)
            return result, start_config, start_statistics
    logger.info("fallback: no set of up to %d float layers reaches the budget", settings.max_float_nodes)
    return result, config, statistics


class _OutOfTime(Exception):
    """The search's time limit passed before a trial."""


def _float_layers(
    state: _Search, before: ir.Model, suspects: Sequence[str], baseline: float, settings: FallbackSettings
) -> list[str] | None:
    """The layers to keep in float (rank, then prefix or greedy), or None within the limits."""
    candidates = _candidates(before, state.spec, state.config, suspects)[: settings.max_candidates]
    order = state.rank(candidates, baseline)
    # Gains of separate layers roughly add up on some models (a prefix of the ranking
    # suffices, in log trials) and interact on others (greedy with re-measured gains).
    helpful = [name for name in order if state.result.sensitivity[name] > 0]
    chosen = state.prefix(helpful, settings.max_float_nodes) if helpful else None
    if chosen is None:
        chosen = state.greedy(order, baseline, settings.max_float_nodes, settings.width)
    if chosen is None and not helpful:
        # No single layer moves the score: a count (samples whose decisions flipped) moves in steps that several
        # layers' rounding make together. The ranking's order, layer-wise suspects first, as long a prefix as it takes.
        chosen = state.prefix(order, settings.max_float_nodes)
    return chosen


def _better_alternative(
    spec: registry.PassSpec,
    config: Any,
    before: ir.Model,
    produced: stats.ModelStats,
    evaluate: Callable[[ir.Model], float],
    baseline: float,
    recalibrate: Callable[[Any], Any],
    result: FallbackResult,
) -> tuple[Any, Any, float] | None:
    """The alternative config scoring best, if it beats ``baseline``: (config, statistics, score).

    An alternative that compresses less than the recipe's config did (more bytes, or a lower
    sparsity: a method that skips layers it has no statistics for) is not one: it is skipped.
    """
    best = None
    for alternative in spec.alternatives(config):
        try:
            alt_statistics = recalibrate(alternative)
        except DataError as exc:  # e.g. GPTQ without calibration data
            logger.info("fallback: alternative %s skipped: %s", alternative, exc)
            continue
        model = before.clone()
        spec.apply(model, alternative, alt_statistics)
        got = stats.model_stats(model, sparsity=True)
        if got.bytes > produced.bytes or (got.sparsity or 0.0) < (produced.sparsity or 0.0):
            logger.info("fallback: alternative %s skipped: it compresses less than the recipe's config", alternative)
            continue
        score = evaluate(model)
        result.trials += 1
        result.alternatives[", ".join(f"{k}={v}" for k, v in _changes(config, alternative).items())] = score
        if score < (best[2] if best else baseline):
            best = (alternative, alt_statistics, score)
    return best


def _wider(
    spec: registry.PassSpec,
    config: Any,
    statistics: Any,
    before: ir.Model,
    produced: stats.ModelStats,
    evaluate: Callable[[ir.Model], float],
    result: FallbackResult,
    deadline: float,
) -> Any | None:
    """The first of the pass's wider configs (more layers at more bits, least first) within budget, or None.

    Every layer stays compressed, so this comes before any layer is left alone: a 4-bit model with a tenth of its
    weights at 8 bits is smaller than one with a tenth in float, and runs on the same kernels. A wider config that
    widens nothing more (no layer fits its share) is not run.
    """
    seen = {produced.bytes}
    for wider in spec.wider(config):
        if time.monotonic() > deadline:
            return None
        model = before.clone()
        spec.apply(model, wider, statistics)
        size = stats.model_stats(model).bytes
        if size in seen:
            continue
        seen.add(size)
        score = evaluate(model)
        result.trials += 1
        result.alternatives[", ".join(f"{k}={v}" for k, v in _changes(config, wider).items())] = score
        if score <= 1.0:
            result.score_after, result.passed = score, True
            return wider
    return None


def _produced(spec: registry.PassSpec, config: Any, before: ir.Model, statistics: Any) -> stats.ModelStats:
    """The statistics (with sparsity) of the step's output as ``config`` makes it."""
    model = before.clone()
    spec.apply(model, config, statistics)
    return stats.model_stats(model, sparsity=True)


def _changes(config: Any, other: Any) -> dict[str, Any]:
    """The options ``other`` sets differently from ``config``."""
    return {
        f.name: getattr(other, f.name)
        for f in dataclasses.fields(config)
        if getattr(other, f.name) != getattr(config, f.name)
    }


def _candidates(before: ir.Model, spec: registry.PassSpec, config: Any, suspects: Sequence[str]) -> list[str]:
    """What the search may keep in float: weighted layers first, suspects before the rest.

    Suspects are node names and ``tensor:NAME`` entries (activations where the layer-wise
    comparison saw SQNR drop; only for passes with ``exclude_tensors``). Weighted layers
    (Conv/MatMul/Gemm/Gather) come first: keeping one in float removes the rounding of its
    weights and of the activations only it reads, which a single tensor rarely does.
    """
    lossy = spec.lossy
    if lossy is None:
        return []
    op_types = set((config.op_types if lossy.op_types else ()) or CANDIDATE_OPS)
    excluded = set(config.exclude)
    nodes = [n for n in before.graph if n.op_type in op_types and n.name and n.name not in excluded]
    rank = {name: i for i, name in enumerate(dict.fromkeys(suspects))}
    nodes.sort(key=lambda n: (n.op_type not in CANDIDATE_OPS, rank.get(n.name, len(rank))))
    tensors = [s for s in rank if s.startswith("tensor:") and lossy.tensors]
    weighted = [n.name for n in nodes if n.op_type in CANDIDATE_OPS]
    return weighted + tensors + [n.name for n in nodes if n.op_type not in CANDIDATE_OPS]
