"""The accuracy budget: its limits, the metrics they read, and the one rule that checks and scores them.

Verification reports violations and the accuracy fallback ranks candidates from the same
table of limits (:data:`LIMITS`), so a new limit is added once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """Accuracy limits per output; None leaves a metric unchecked.

    Attributes:
        max_abs: Largest allowed absolute difference.
        max_rel_l2: Largest allowed ||cand - ref|| / ||ref||.
        min_cosine: Smallest allowed per-sample cosine similarity (the minimum over samples).
        min_cosine_mean: Smallest allowed mean over samples of the cosine similarity.
        min_top1: Smallest allowed share of samples whose arg-max class agrees (rank-2 outputs).
        min_decisions: Smallest allowed share of samples whose class decisions stand, on outputs that are
            decisions (:func:`graphopt.verify.decision_outputs`: class scores out of a Softmax, ArgMax ids,
            a Sigmoid's probabilities): a sample's decisions stand when at least 99% of its positions keep their
            arg-max class (every one in a sequence shorter than 100: a CTC line, a short tag sequence, a single
            label); for probabilities, when the positions at or above 0.5 keep an IoU of at least 0.95.
        max_perplexity_increase: Largest allowed relative rise of a language model's perplexity on
            the verification tokens (0.1: +10%), for logits ``[batch, sequence, vocabulary]`` of a
            model fed token ids (see :mod:`graphopt.verify`).
        min_token_top1: Smallest allowed share of positions whose next-token arg-max agrees (the same
            outputs).
        outputs: Outputs the budget applies to; empty means all.
        max_latency_ratio: Largest allowed median latency of the output over the input's, timed
            interleaved on the verification device (a whole-model limit: :mod:`graphopt.speed`); for a
            decoder with a KV cache, that of one generation: the prompt, then a decode step per prompt token.
    """

    max_abs: float | None = None
    max_rel_l2: float | None = None
    min_cosine: float | None = None
    min_cosine_mean: float | None = None
    min_top1: float | None = None
    min_decisions: float | None = None
    max_perplexity_increase: float | None = None
    min_token_top1: float | None = None
    outputs: tuple[str, ...] = ()
    max_latency_ratio: float | None = None

    def __post_init__(self) -> None:
        # A limit no model can meet (min_cosine 5), or one that never compares (NaN), would run
        # every pass to the end before saying so: refuse it before anything runs.
        for name, (low, high) in BOUNDS.items():
            value = getattr(self, name)
            if value is not None and not low <= value <= high:
                raise ValueError(f"{name} must be between {low} and {high}; got {value}.")


# The range each limit can take: errors are >= 0, cosines lie in [-1, 1], agreement in [0, 1].
BOUNDS = {
    "max_abs": (0.0, math.inf),
    "max_rel_l2": (0.0, math.inf),
    "min_cosine": (-1.0, 1.0),
    "min_cosine_mean": (-1.0, 1.0),
    "min_top1": (0.0, 1.0),
    "min_decisions": (0.0, 1.0),
    "max_perplexity_increase": (0.0, math.inf),
    "min_token_top1": (0.0, 1.0),
    "max_latency_ratio": (0.01, 100.0),
}


@dataclass
class OutputMetrics:
    """How far one output of the candidate is from the reference."""

    name: str
    max_abs: float = 0.0
    rel_l2: float = 0.0
    cosine_mean: float = 1.0
    cosine_min: float = 1.0
    top1: float | None = None
    decisions: float | None = None  # decision outputs only: share of samples whose decisions stand
    reference_max_abs: float = 0.0
    # language-model logits only: perplexity of the tokens that follow, and next-token agreement
    tokens: int | None = None
    perplexity: float | None = None
    reference_perplexity: float | None = None
    token_top1: float | None = None
    # feeds on which the candidate's output had another shape, of all feeds, the first pair of shapes, and the mean
    # relative difference of sizes there: nothing compares, so it misses any budget
    reshaped: tuple[int, int, tuple[int, ...], tuple[int, ...], float] | None = None

    @property
    def perplexity_increase(self) -> float | None:
        """Relative rise of the perplexity over the reference's (0.05: +5%)."""
        if self.perplexity is None or not self.reference_perplexity:
            return None
        return self.perplexity / self.reference_perplexity - 1.0


@dataclass(frozen=True)
class Limit:
    """One budget field: the metric it bounds, from above (an error) or from below (an agreement)."""

    field: str
    metric: str
    upper: bool
    label: str
    digits: str  # how the message prints the metric


LIMITS = (
    Limit("max_abs", "max_abs", True, "max abs error", ".3g"),
    Limit("max_rel_l2", "rel_l2", True, "relative L2", ".3g"),
    Limit("min_cosine", "cosine_min", False, "min cosine", ".6f"),
    Limit("min_cosine_mean", "cosine_mean", False, "mean cosine", ".6f"),
    Limit("min_top1", "top1", False, "top-1 agreement", ".4f"),
    Limit("min_decisions", "decisions", False, "decisions standing", ".4f"),
    Limit("max_perplexity_increase", "perplexity_increase", True, "perplexity increase", "+.2%"),
    Limit("min_token_top1", "token_top1", False, "next-token top-1 agreement", ".4f"),
)


def ratio(limit: Limit, value: float, bound: float) -> float:
    """How much of the budget ``value`` uses: <= 1 within it, 1 exactly at the limit, 0 when perfect."""
    if math.isnan(value):
        return math.inf
    if limit.upper:
        return value / bound if bound > 0 else (0.0 if value == 0 else math.inf)
    if bound >= 1.0:  # (1 - value) / (1 - bound) with no room at all
        return 0.0 if value >= 1.0 else math.inf
    return max(0.0, 1.0 - value) / (1.0 - bound)


TOKEN_LIMITS = ("max_perplexity_increase", "min_token_top1")


def for_outputs(outputs: Iterable[OutputMetrics], budget: Budget) -> Budget:
    """The budget that judges these outputs: for a language model, its token limits alone.

    When the budget sets a token limit and an output is a language model's logits, the model is
    judged by its next-token predictions: the per-output limits (cosine, errors, top-1) stop
    applying to every output. A decoder's KV-cache outputs move by a few percent under 4-bit weights
    while its perplexity rises by a few percent; what the cache does to later tokens already shows in
    the prompt's own predictions, which attend to the same keys and values.
    """
    if not any(getattr(budget, name) is not None for name in TOKEN_LIMITS):
        return budget
    if not any(o.tokens for o in outputs if not budget.outputs or o.name in budget.outputs):
        return budget  # no logits among the outputs the budget judges: its limits stay as written
    kept = {name: getattr(budget, name) for name in TOKEN_LIMITS}
    return Budget(**kept, outputs=budget.outputs, max_latency_ratio=budget.max_latency_ratio)


def checked(metrics: OutputMetrics, budget: Budget) -> Iterable[tuple[Limit, float, float]]:
    """(limit, metric value, bound) of every limit the budget sets that applies to this output."""
    if budget.outputs and metrics.name not in budget.outputs:
        return
    for limit in LIMITS:
        bound = getattr(budget, limit.field)
        value = getattr(metrics, limit.metric)
        if bound is not None and value is not None:
            yield limit, float(value), float(bound)


def violations(metrics: OutputMetrics, budget: Budget) -> list[str]:
    """One message per limit this output misses (a change of shape misses every budget)."""
    found = []
    if metrics.reshaped and not (budget.outputs and metrics.name not in budget.outputs):
        count, feeds, ref, cand, _ = metrics.reshaped
        found.append(f"output {metrics.name!r}: shape {cand} instead of {ref} on {count} of {feeds} feeds")
    for limit, value, bound in checked(metrics, budget):
        if ratio(limit, value, bound) > 1.0:
            sign = ">" if limit.upper else "<"
            bound_text = f"{bound:{limit.digits}}" if limit.upper else f"{bound}"
            found.append(f"output {metrics.name!r}: {limit.label} {value:{limit.digits}} {sign} budget {bound_text}")
    return found


def token_summary(metrics: OutputMetrics) -> str | None:
    """One line on a language model's logits: perplexity on the verification tokens and next-token agreement."""
    if not metrics.tokens or metrics.perplexity is None or metrics.reference_perplexity is None:
        return None
    return (
        f"output {metrics.name!r}: perplexity {metrics.perplexity:.4g} vs {metrics.reference_perplexity:.4g} "
        f"({metrics.perplexity_increase:+.2%}) on {metrics.tokens} next tokens; next-token top-1 agreement "
        f"{metrics.token_top1:.4f}"
    )


def describe(budget: Budget) -> str:
    """The accuracy limits a budget sets, as a reader checks them ("min cosine >= 0.9"); empty when it sets none.

    ``max_latency_ratio`` is judged on the whole model, after verification (:mod:`graphopt.speed`).
    """
    parts = []
    for limit in LIMITS:
        bound = getattr(budget, limit.field)
        if bound is not None:
            shown = f"{bound:{limit.digits}}" if limit.digits.endswith("%") else f"{bound:g}"
            parts.append(f"{limit.label} {'<=' if limit.upper else '>='} {shown}")
    where = f" on {', '.join(budget.outputs)}" if budget.outputs and parts else ""
    return "; ".join(parts) + where


# The score of an output whose shape changed: above any ratio a comparable output reaches in practice, plus the
# share of feeds it changed on and how far its sizes moved.
RESHAPED = 1e3


def score(outputs: Iterable[OutputMetrics], budget: Budget) -> float:
    """The worst budget ratio over outputs and limits: <= 1 means within budget (an output whose shape changed
    scores :data:`RESHAPED` and more)."""
    outputs = list(outputs)
    budget = for_outputs(outputs, budget)
    reshaped = [o.reshaped for o in outputs if o.reshaped and (not budget.outputs or o.name in budget.outputs)]
    if reshaped:  # over any budget; still ranked, so that the fallback finds the layers that move a shape back
        return RESHAPED + sum(count / feeds + gap for count, feeds, _, _, gap in reshaped)
    ratios = (ratio(limit, value, bound) for out in outputs for limit, value, bound in checked(out, budget))
    return max(ratios, default=0.0)
