"""Compare a candidate model with its reference in ONNX Runtime, against a budget.

Both models run on the same device and the same input batches. Metrics are reduced
batch by batch (sums and extremes), so memory does not grow with the sample count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from graphopt import budget as budget_rules
from graphopt import prober, runtime
from graphopt.budget import Budget, OutputMetrics
from graphopt.calibration.sources import (
    PAST_PREFIX,
    Batch,
    DataSpec,
    InputSpec,
    batch_samples,
    input_specs,
    iter_batches,
)
from graphopt.errors import DataError, ModelLoadError, PassError, RecipeError

logger = logging.getLogger(__name__)


@dataclass
class _Accumulator:
    name: str
    max_abs: float = 0.0
    ref_max: float = 0.0
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    cos_sum: float = 0.0
    cos_min: float = 1.0
    rows: int = 0
    agree: int = 0
    classified: int = 0
    tokens: int = 0  # language-model logits: positions scored, their NLL sums, next-token agreement
    ref_nll: float = 0.0
    cand_nll: float = 0.0
    token_agree: int = 0
    positions: int = 0
    kind: str | None = None  # a decision output (decision_outputs): "scores", "ids" or "probabilities"
    decided: int = 0  # samples whose decisions were compared, and those whose decisions stood
    stood: int = 0
    # probabilities: the most positions a sample has; the reference's values read, and those still undecided
    map_positions: int = 0
    map_values: int = 0
    map_undecided: int = 0
    feeds: int = 0  # feeds run, and those where the candidate's output had another shape (the first such pair)
    reshaped: int = 0
    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    size_gap: float = 0.0  # sum over those feeds of |candidate size - reference size| / reference size

    def add(
        self,
        ref: np.ndarray,
        cand: np.ndarray,
        ids: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        samples: int | None = None,
    ) -> None:
        self.feeds += 1
        if ref.shape != cand.shape:  # e.g. a TTS model's predicted durations moved: no value compares, it fails
            self.reshaped += 1
            self.shapes = self.shapes or (tuple(ref.shape), tuple(cand.shape))
            self.size_gap += abs(cand.size - ref.size) / max(ref.size, 1)
            return
        if ref.dtype.kind in "OSU" or cand.dtype.kind in "OSU":
            self._add_strings(ref, cand, samples)
            return
        if ref.dtype == np.bool_ or not np.issubdtype(ref.dtype, np.number):
            ref, cand = ref.astype(np.float64), cand.astype(np.float64)
        r, c = ref.astype(np.float64, copy=False), cand.astype(np.float64, copy=False)
        # The error metrics compare values: an infinity or NaN both models give (a -inf mask passed through) agrees
        # and counts as 0 in both; one that only one model gives is an error without bound (NaN, below: infinite).
        # Arg-maxes and perplexity read the values as they are (a masked -inf is the smallest score there).
        er, ec = r, c
        if not (np.isfinite(r).all() and np.isfinite(c).all()):
            same = (r == c) | (np.isnan(r) & np.isnan(c))
            er, ec = np.where(same & ~np.isfinite(r), 0.0, r), np.where(same & ~np.isfinite(c), 0.0, c)
        diff = np.abs(er - ec)
        self.max_abs = max(self.max_abs, float(np.nanmax(diff, initial=0.0)) if not np.isnan(diff).any() else math.inf)
        self.ref_max = max(self.ref_max, float(np.max(np.abs(er), initial=0.0)))
        self.diff_sq += float(np.sum((er - ec) ** 2))
        self.ref_sq += float(np.sum(er**2))
        rows_r = er.reshape(er.shape[0], -1) if er.ndim > 1 else er.reshape(1, -1)
        rows_c = ec.reshape(rows_r.shape)
        cosine = _cosine_rows(rows_r, rows_c)
        self.cos_sum += float(cosine.sum())
        self.cos_min = min(self.cos_min, float(cosine.min(initial=1.0)))
        self.rows += len(cosine)
        if r.ndim == 2 and r.shape[1] > 1 and np.issubdtype(ref.dtype, np.floating):
            self.agree += int(np.sum(np.argmax(r, axis=1) == np.argmax(c, axis=1)))
            self.classified += r.shape[0]
        if ids is not None and "logit" in self.name.lower() and is_lm_logits(ref, ids):
            self._add_tokens(r, c, ids, mask if mask is not None and mask.shape == ids.shape else None)
        if self.kind is not None and ref.ndim >= 1:
            self._add_decisions(ref, cand, samples or ref.shape[0])

    def _add_strings(self, ref: np.ndarray, cand: np.ndarray, samples: int | None) -> None:
        """Strings (a label looked up in a table) are equal or not. They have no angle and no class scores: their
        max abs error is 1 where one changed, their relative L2 the square root of the share changed, and they are
        decisions (ids) where the graph says so."""
        changed = np.asarray(ref != cand, dtype=bool)
        self.max_abs = max(self.max_abs, float(changed.any()))
        self.ref_max = max(self.ref_max, 1.0)
        self.diff_sq += float(np.count_nonzero(changed))
        self.ref_sq += float(changed.size)
        if self.kind is not None and ref.ndim >= 1:
            self._add_decisions(ref, cand, samples or ref.shape[0])

    def _add_decisions(self, ref: np.ndarray, cand: np.ndarray, samples: int) -> None:
        """Per sample: whether its decisions stand. Scores and ids: at least :data:`DECISIONS_KEPT` of its
        positions keep their class (the arg-max over the last axis of scores; the values themselves of ids).
        Probabilities: the positions at or above 0.5 in the two models overlap by at least :data:`MASK_IOU_KEPT`
        (intersection over union; none in either model is full agreement).

        The sample axis is the one as long as the batch (axis 0 first: a time-major ``[T, B, C]`` output has it
        second); an output with none, or several, is one sample whole (a batch folded into positions)."""
        if self.kind == "scores":
            if ref.ndim < 2 or ref.shape[-1] < 2:
                return
            ref, cand = np.argmax(ref, axis=-1), np.argmax(cand, axis=-1)
        elif self.kind == "probabilities":
            self.map_values += ref.size
            self.map_undecided += int(np.count_nonzero((ref > UNDECIDED[0]) & (ref < UNDECIDED[1])))
            ref, cand = ref >= 0.5, cand >= 0.5
        ref, cand = _per_sample(ref, samples), _per_sample(cand, samples)
        if self.kind == "probabilities":
            self.map_positions = max(self.map_positions, ref.shape[1])
            union = np.sum(ref | cand, axis=1)
            kept = np.sum(ref & cand, axis=1) / np.maximum(union, 1)
            stood = np.where(union == 0, 1.0, kept) >= MASK_IOU_KEPT - 1e-12
        else:
            same = ref == cand
            kept = same.mean(axis=1) if same.shape[1] else np.ones(len(same))
            stood = kept >= DECISIONS_KEPT - 1e-12
        self.decided += len(stood)
        self.stood += int(np.sum(stood))

    def _judged(self) -> bool:
        """Whether the decisions counted are decisions: a Sigmoid's map only where the reference has decided
        most of its positions (a probability of one position per sample, a binary classifier's, always is)."""
        if self.kind != "probabilities" or self.map_positions <= 1:
            return True
        return self.map_undecided <= MAP_UNDECIDED_SHARE * self.map_values

    def _add_tokens(self, ref: np.ndarray, cand: np.ndarray, ids: np.ndarray, mask: np.ndarray | None) -> None:
        """Perplexity of each sequence's next tokens under both models, and where their arg-maxes agree; padding
        (``mask`` 0) is left out."""
        valid = np.ones(ids.shape, bool) if mask is None else np.asarray(mask) != 0
        agree = np.argmax(ref, axis=-1) == np.argmax(cand, axis=-1)
        self.token_agree += int(np.sum(agree & valid))
        self.positions += int(valid.sum())
        scored = valid[:, :-1] & valid[:, 1:]  # a position and the token after it are both real
        for row in range(len(ids)):  # one sequence at a time: [S, V] in float64, not the whole batch
            keep = np.flatnonzero(scored[row])
            if keep.size:
                self.ref_nll += _nll(ref[row, keep], ids[row, keep + 1])
                self.cand_nll += _nll(cand[row, keep], ids[row, keep + 1])
                self.tokens += keep.size

    def result(self) -> OutputMetrics:
        rel = math.sqrt(self.diff_sq / self.ref_sq) if self.ref_sq > 0 else math.sqrt(self.diff_sq)
        return OutputMetrics(
            name=self.name,
            max_abs=self.max_abs,
            rel_l2=rel,
            cosine_mean=self.cos_sum / self.rows if self.rows else 1.0,
            cosine_min=self.cos_min,
            top1=self.agree / self.classified if self.classified else None,
            decisions=self.stood / self.decided if self.decided and self._judged() else None,
            reference_max_abs=self.ref_max,
            tokens=self.tokens or None,
            perplexity=math.exp(self.cand_nll / self.tokens) if self.tokens else None,
            reference_perplexity=math.exp(self.ref_nll / self.tokens) if self.tokens else None,
            token_top1=self.token_agree / self.positions if self.positions and self.tokens else None,
            reshaped=(self.reshaped, self.feeds, *self.shapes, self.size_gap / self.reshaped) if self.shapes else None,
        )


# A sample's decisions stand when this share of its positions keep their class: all of them below 100 positions.
DECISIONS_KEPT = 0.99
# A probability map's (a Sigmoid's) decisions stand when its thresholded positions overlap this much: the IoU that
# segmentation and text-map detection are held to.
MASK_IOU_KEPT = 0.95
# A Sigmoid's map is a yes/no map where at most this share of the reference's values lies strictly between
# UNDECIDED's bounds: a text or segmentation map is saturated near 0 and 1 but at its edges; an image, a gain mask or
# a matte in (0, 1) is not, and its values near 0.5 would flip the "decision" on noise.
MAP_UNDECIDED_SHARE = 0.1
UNDECIDED = (0.1, 0.9)


def _per_sample(array: np.ndarray, samples: int) -> np.ndarray:
    """``array`` as ``[samples, positions]``: along the axis as long as the batch, or one sample whole."""
    if array.ndim and array.shape[0] == samples:
        return array.reshape(samples, -1)
    axes = [a for a in range(array.ndim) if array.shape[a] == samples]
    return np.moveaxis(array, axes[0], 0).reshape(samples, -1) if len(axes) == 1 else array.reshape(1, -1)


# Ops that move a tensor's data without changing its values: the class axis is followed through them.
_MOVES = ("Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Cast")


def decision_outputs(model: ir.Model) -> dict[str, str]:
    """The graph outputs that are class decisions, by kind: "scores" (a Softmax/LogSoftmax's probabilities whose
    class axis ends up last, so that the arg-max there is the decision), "ids" (an ArgMax's integers, or strings) or
    "probabilities" (a Sigmoid's: a yes/no per position, such as a voice-activity flag or a segmentation map).

    Found through data movement: the class axis is followed through Transposes (their ``perm``); Reshape,
    Squeeze, Unsqueeze and Flatten are crossed only with the classes last on both sides, their count known
    from the Softmax's shapes and equal to the output's fixed last dimension. Raw logits with no Softmax in the
    graph count when they are named so and come straight out of a linear head (:func:`_raw_logits`); other outputs
    of a Gemm are not recognized (an embedding's arg-max means nothing): their top-1 is ``min_top1`` (rank 2).
    """
    opset = model.opset_imports.get("", 0)
    found: dict[str, str] = {}
    for value in model.graph.outputs:
        moves: list[ir.Node] = []
        node = value.producer()
        while node is not None and node.op_type in _MOVES and node.domain in ("", "ai.onnx") and len(moves) < 4:
            moves.append(node)
            source = node.inputs[0] if node.inputs else None
            node = source.producer() if source is not None else None
        if value.dtype == ir.DataType.STRING:  # labels from a table (Gather, ai.onnx.ml's LabelEncoder): equal or not
            found[value.name] = "ids"
            continue
        if node is None or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "ArgMax" and value.dtype in (ir.DataType.INT64, ir.DataType.INT32):
            found[value.name] = "ids"
        elif node.op_type == "Sigmoid" and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            found[value.name] = "probabilities"
        else:
            softmax = node.op_type in ("Softmax", "LogSoftmax") and _classes_last(node, reversed(moves), value, opset)
            if softmax or _raw_logits(node, moves, value):
                found[value.name] = "scores"
    return found


# The most classes raw logits may have to be judged as decisions: a language model's vocabulary (tens of thousands
# of tokens) is judged by perplexity on token windows instead.
MAX_LOGIT_CLASSES = 4096


def _raw_logits(node: ir.Node, moves: Sequence[ir.Node], output: ir.Value) -> bool:
    """Whether ``output`` is a classifier's or tagger's raw class scores: named ``...logits...`` (as exporters name
    them), straight out of a linear head (Gemm, MatMul, or the Add of its bias) with nothing but casts on the way,
    rank 2 or 3, its last axis 2 to :data:`MAX_LOGIT_CLASSES` classes."""
    shape = output.shape
    if "logit" not in output.name.lower() or output.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return False
    if any(m.op_type not in ("Identity", "Cast") for m in moves) or shape is None or len(shape) not in (2, 3):
        return False
    if not isinstance(shape[-1], int) or not 2 <= shape[-1] <= MAX_LOGIT_CLASSES:
        return False
    if node.op_type == "Add":  # MatMul's bias
        heads = [v.producer() for v in node.inputs if v is not None and v.producer() is not None]
        node = next((h for h in heads if h.op_type in ("MatMul", "Gemm")), node)  # type: ignore[union-attr]
    return node.op_type in ("Gemm", "MatMul") and node.domain in ("", "ai.onnx")


def _classes_last(softmax: ir.Node, moves: Iterable[ir.Node], output: ir.Value, opset: int) -> bool:
    """Whether the Softmax's class axis is ``output``'s last axis after ``moves`` (Softmax first)."""
    out_shape = output.shape
    if out_shape is None or len(out_shape) < 2 or not isinstance(out_shape[-1], int) or out_shape[-1] < 2:
        return False
    shape = softmax.outputs[0].shape
    rank = len(shape) if shape is not None else None
    axis = softmax.attributes.get_int("axis", -1 if opset >= 13 else 1)
    if opset < 13 and not (axis == -1 or (rank is not None and axis == rank - 1)):
        return False  # opset < 13 normalizes over every axis from ``axis`` on: per-position classes only if last
    last = axis == -1 or (rank is not None and axis == rank - 1)
    classes = None  # the class count, where the Softmax's shapes say it
    for known in (shape, softmax.inputs[0].shape if softmax.inputs and softmax.inputs[0] is not None else None):
        if known is not None and -len(known) <= axis < len(known) and isinstance(known[axis], int):
            classes = known[axis]
            break
    for move in moves:
        if move.op_type == "Transpose":
            perm = list(move.attributes.get_ints("perm", ()))
            if not perm:
                return False
            rank, position = len(perm), axis if axis >= 0 else len(perm) + axis
            if not 0 <= position < rank:
                return False
            axis = perm.index(position)
            last = axis == rank - 1
        elif move.op_type in ("Identity", "Cast"):
            continue
        elif not last or classes != out_shape[-1]:
            # Reshape, Squeeze, Unsqueeze, Flatten: only with the classes last on both sides, as many as the output's
            # last dimension (a flattened [B, T * C] is not per-position classes)
            return False
        else:
            axis, rank = -1, None
    return last


# Names under which models take the token ids their logits score (Hugging Face, ORT GenAI, fairseq); the output
# must be named "...logits..." too (every LM exporter names it so), or an encoder's hidden states would pass.
TOKEN_INPUTS = ("input_ids", "ids", "tokens", "token_ids", "src_tokens")


def token_input(batch: Batch) -> str | None:
    """The input of ``batch`` that holds a language model's ``[batch, sequence]`` integer token ids, if any."""
    for name, array in batch.items():
        array = np.asarray(array)
        if name.lower().rsplit("/", 1)[-1] in TOKEN_INPUTS and array.ndim == 2 and array.dtype.kind in "iu":
            return name
    return None


def token_ids(batch: Batch) -> np.ndarray | None:
    """The ``[batch, sequence]`` integer token ids a language model is fed in ``batch``, if any."""
    name = token_input(batch)
    return None if name is None else np.asarray(batch[name])


def is_lm_logits(output: np.ndarray, ids: np.ndarray) -> bool:
    """Whether ``output`` scores a vocabulary at every position of ``ids``: ``[batch, sequence, V]``, V above
    every id, floating point."""
    return (
        output.ndim == 3
        and output.shape[:2] == ids.shape
        and np.issubdtype(output.dtype, np.floating)
        and ids.size > 0
        and int(ids.min()) >= 0
        and int(ids.max()) < output.shape[2]
    )


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood of ``targets [S]`` under ``logits [S, V]`` (log-softmax in float64)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=-1))
    return float(np.sum(log_norm - z[np.arange(len(targets)), targets]))


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dot = np.sum(a * b, axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), 0.0)
    return np.where(both_zero, 1.0, np.nan_to_num(cosine, nan=0.0))


@dataclass
class VerifyResult:
    """Per-output metrics of a candidate against its reference, and the budget verdict."""

    device: str
    samples: int
    outputs: list[OutputMetrics] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    budget: str = ""  # the limits checked (budget.describe); empty: metrics reported, nothing checked

    @property
    def passed(self) -> bool:
        return not self.violations

    def score(self, budget: Budget) -> float:
        """The worst budget ratio over outputs and limits: <= 1 means within budget."""
        return budget_rules.score(self.outputs, budget)

    def to_dict(self) -> dict[str, object]:
        return {
            "device": self.device,
            "samples": self.samples,
            "passed": self.passed,
            "budget": self.budget or None,
            "violations": list(self.violations),
            "outputs": [_output_dict(o) for o in self.outputs],
        }


def _output_dict(metrics: OutputMetrics) -> dict[str, object]:
    out = asdict(metrics)
    if metrics.tokens:
        out["perplexity_increase"] = metrics.perplexity_increase
    else:  # not a language model's logits: leave the token fields out
        for key in ("tokens", "perplexity", "reference_perplexity", "token_top1"):
            out.pop(key)
    return out


def open_candidate(
    candidate: runtime.ModelSource, device: str, threads: int | None = None, *, spinning: bool = False
) -> ort.InferenceSession:
    """A session for an optimized model; failing to load is the passes' fault, not the user's."""
    try:
        return runtime.create_session(candidate, device, threads=threads, spinning=spinning)
    except ModelLoadError as exc:
        raise PassError(f"the optimized model does not load although the input does: {exc}") from exc


def compare_sessions(
    ref_session: ort.InferenceSession,
    cand_session: ort.InferenceSession,
    batches: Iterable[Batch],
    *,
    device: str = "cpu",
    budget: Budget | None = None,
    decisions: dict[str, str] | None = None,
    reference: Callable[[int, Batch, list[str]], dict[str, np.ndarray]] | None = None,
) -> VerifyResult:
    """Run two open sessions on ``batches`` and reduce per-output metrics (``decisions``: the outputs that are
    class decisions, :func:`decision_outputs`; ``reference``: the reference's outputs on batch ``i``, where they are
    kept from an earlier comparison, instead of running ``ref_session``)."""
    ref_names = [o.name for o in ref_session.get_outputs()]
    cand_names = {o.name for o in cand_session.get_outputs()}
    missing = [n for n in ref_names if n not in cand_names]
    if missing:
        raise DataError(f"the candidate lacks reference output(s) {missing}; graph outputs must keep their names.")
    budget = budget or Budget()
    unknown = [name for name in budget.outputs if name not in ref_names]
    if unknown:
        raise RecipeError(f"budget.outputs names {unknown}, which the model does not have; its outputs: {ref_names}.")
    accumulators = {name: _Accumulator(name, kind=(decisions or {}).get(name)) for name in ref_names}
    samples = 0
    for index, batch in enumerate(batches):
        ref_out = reference(index, batch, ref_names) if reference else runtime.run(ref_session, batch, ref_names)
        try:
            cand_out = runtime.run(cand_session, batch, ref_names)
        except DataError as exc:  # the reference ran on this batch, so the data is not to blame
            raise PassError(f"the candidate model refuses inputs its reference runs on: {exc}") from exc
        ids, mask = token_ids(batch), batch.get("attention_mask")
        count = batch_samples(batch)
        for name in ref_names:
            accumulators[name].add(np.asarray(ref_out[name]), np.asarray(cand_out[name]), ids, mask, count)
        samples += count
    if samples == 0:
        raise DataError("no input batches to verify with; give data with samples in it.")
    metrics = [acc.result() for acc in accumulators.values()]
    judged = budget_rules.for_outputs(metrics, budget)
    violations = [v for m in metrics for v in budget_rules.violations(m, judged)]
    described = budget_rules.describe(judged)
    if judged is not budget and described:
        described += " (a language model: judged by its next tokens; per-output limits not applied)"
    return VerifyResult(device=device, samples=samples, outputs=metrics, violations=violations, budget=described)


def compare(
    reference: runtime.ModelSource,
    candidate: runtime.ModelSource,
    batches: Iterable[Batch],
    *,
    device: str = "cpu",
    budget: Budget | None = None,
    threads: int | None = None,
    decisions: dict[str, str] | None = None,
) -> VerifyResult:
    """Run both models on ``batches`` and reduce per-output metrics."""
    ref_session = runtime.create_session(reference, device, threads=threads)
    cand_session = open_candidate(candidate, device, threads)
    return compare_sessions(ref_session, cand_session, batches, device=device, budget=budget, decisions=decisions)


def verify_models(
    reference: ir.Model,
    candidate: ir.Model,
    data: DataSpec,
    *,
    device: str = "cpu",
    budget: Budget | None = None,
    threads: int | None = None,
) -> VerifyResult:
    """Verify ``candidate`` against ``reference`` on inputs described by ``data``."""
    _check_same_inputs(reference, candidate)
    batches = iter_batches(data, input_specs(reference))
    decisions = decision_outputs(reference)
    return compare(reference, candidate, batches, device=device, budget=budget, threads=threads, decisions=decisions)


def _check_same_inputs(reference: ir.Model, candidate: ir.Model) -> None:
    """Both models must take the same inputs, or no batch can feed them both."""
    ref = {s.name: s for s in input_specs(reference)}
    cand = {s.name: s for s in input_specs(candidate)}
    differ = sorted(set(ref) ^ set(cand)) + [
        name
        for name in sorted(set(ref) & set(cand))
        if ref[name].dtype != cand[name].dtype or not _shapes_agree(ref[name].shape, cand[name].shape)
    ]
    if differ:

        def text(specs: dict[str, InputSpec], name: str) -> str:
            spec = specs.get(name)
            return f"{spec.dtype} {list(spec.shape)}" if spec else "absent"

        details = "; ".join(f"{n}: reference {text(ref, n)}, candidate {text(cand, n)}" for n in differ)
        raise DataError(
            f"the two models take different inputs ({details}). Verify a candidate made from this reference, "
            "with the same input names, dtypes and shapes."
        )


def _shapes_agree(a: tuple[int | str | None, ...], b: tuple[int | str | None, ...]) -> bool:
    """Same rank, and equal wherever both dims are fixed."""
    fixed = (isinstance(x, int) and isinstance(y, int) for x, y in zip(a, b, strict=False))
    return len(a) == len(b) and all(x == y for x, y, f in zip(a, b, fixed, strict=False) if f)


def label_accuracy(
    model: runtime.ModelSource,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray,
    *,
    output: str | None = None,
    device: str = "cpu",
    batch_size: int = 256,
) -> float:
    """Share of samples whose arg-max over ``output`` (default: the first) equals the label."""
    session = runtime.create_session(model, device)
    name = output or session.get_outputs()[0].name
    correct = 0
    for start in range(0, len(labels), batch_size):
        feeds = {k: v[start : start + batch_size] for k, v in inputs.items()}
        scores = runtime.run(session, feeds, [name])[name]
        correct += int(np.sum(np.argmax(scores, axis=-1) == labels[start : start + batch_size]))
    return correct / len(labels) if len(labels) else 0.0


Timings = dict[str, runtime.Latency]  # "reference" and "optimized" medians of one interleaved timing
PAST, PRESENT = PAST_PREFIX, "present"  # the KV-cache names of ORT GenAI and Hugging Face exports


def decode_feeds(session: ort.InferenceSession, prompt: Batch) -> Batch | None:
    """The inputs of one decode step after ``prompt``: the next token (the prompt's last arg-max), the cache the
    prompt left (``present.*`` fed back as ``past_key_values.*``), the attention mask and positions one longer.

    None unless every input is one of those: token ids, ``attention_mask``, ``position_ids`` and cache entries that
    the model returns under the matching ``present`` name.
    """
    ids = token_ids(prompt)
    names = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    past = [n for n in names if n.startswith(PAST)]
    if ids is None or not past or "logits" not in outputs:
        return None
    if any(n.replace(PAST, PRESENT, 1) not in outputs for n in past):
        return None
    token = token_input(prompt)
    if set(names) - set(past) - {"attention_mask", "position_ids", token} or any(
        np.asarray(prompt[n]).size != 0 for n in past if n in prompt
    ):
        return None  # other inputs, or a prompt that already reads a (non-empty) cache
    fetched = [*(n.replace(PAST, PRESENT, 1) for n in past), "logits"]
    out = runtime.run(session, prompt, fetched)
    length = ids.shape[1]
    feeds: Batch = {}
    for name in names:
        if name in past:
            feeds[name] = out[name.replace(PAST, PRESENT, 1)]
        elif name == "attention_mask":
            feeds[name] = np.ones((ids.shape[0], length + 1), np.asarray(prompt[name]).dtype)
        elif name == "position_ids":
            feeds[name] = np.full((ids.shape[0], 1), length, np.asarray(prompt[name]).dtype)
        else:  # the token ids: the prompt's next token
            feeds[name] = out["logits"][:, -1].argmax(-1)[:, None].astype(ids.dtype)
    return feeds


# Verification batches up to this size are read once and kept for every fallback trial.
CACHED_BYTES = 256 * 2**20


# Ops whose outputs differ from run to run: a model holding them may not reproduce its own outputs.
RANDOM_OPS = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli")


class Checker:
    """Verifies candidates against one reference session, opened once for every trial."""

    def __init__(self, reference: ir.Model, data: DataSpec, budget: Budget, device: str, threads: int | None):
        self.reference, self.data, self.budget, self.device, self.threads = reference, data, budget, device, threads
        self.ref_session = runtime.create_session(reference, device, threads=threads)
        self.specs = input_specs(reference)
        self.decisions = decision_outputs(reference)
        self._timing_cand: tuple[ir.Model, ort.InferenceSession] | None = None
        self._last_timed: tuple[ir.Model, dict[str, runtime.Latency]] | None = None
        self._last_decode: tuple[ir.Model, dict[str, runtime.Latency]] | None = None
        self._decode: tuple[Batch | None] | None = None  # a decoder's one-step feeds, once made
        self._cached: list[Batch] | tuple[()] | None = None
        self._ref_outputs: dict[int, dict[str, np.ndarray]] = {}  # the reference's outputs per kept batch

    def check(self, candidate: ir.Model, *, probe: bool = False) -> tuple[ort.InferenceSession, VerifyResult]:
        """The candidate's session and its verification result.

        ``probe`` first loads it in a child process (see :func:`prober.probe_load`), so an ORT
        crash on the output is an error and not the end of graphopt.
        """
        if probe:
            try:
                prober.probe_load(candidate, self.device)
            except ModelLoadError as exc:
                raise PassError(f"the optimized model does not load although the input does: {exc}") from exc
            self._reproducible()
        session = open_candidate(candidate, self.device, self.threads)
        batches = self._batches()
        result = compare_sessions(
            self.ref_session,
            session,
            batches,
            device=self.device,
            budget=self.budget,
            decisions=self.decisions,
            reference=self._reference_outputs,
        )
        return session, result

    def _reference_outputs(self, index: int, batch: Batch, names: list[str]) -> dict[str, np.ndarray]:
        """The reference's outputs on verification batch ``index``: run once, and kept for every later trial while
        the batches themselves are kept and the outputs fit in :data:`CACHED_BYTES` (the reference never changes;
        it reproduces itself, :meth:`_reproducible`)."""
        kept = self._ref_outputs.get(index)
        if kept is not None:
            return kept
        outputs = runtime.run(self.ref_session, batch, names)
        held = sum(np.asarray(a).nbytes for kept in (*self._ref_outputs.values(), outputs) for a in kept.values())
        if self._cached and held <= CACHED_BYTES:
            self._ref_outputs[index] = outputs
        return outputs

    def _reproducible(self) -> None:
        """Refuse a reference whose second run on the first batch misses the budget against its first: no candidate
        could be judged against it (a sampling model's noise, a TTS model's random durations)."""
        first = next(iter(self._batches()), None)
        if first is None:
            return
        session = self.ref_session
        again = compare_sessions(session, session, [first], budget=self.budget, decisions=self.decisions)
        if again.passed:
            return
        graphs = ir.traversal.RecursiveGraphIterator(self.reference.graph)
        random = sorted({n.op_type for n in graphs if n.op_type in RANDOM_OPS and n.domain in ("", "ai.onnx")})
        raise DataError(
            f"the input model does not reproduce its own outputs: run twice on the same inputs, {again.violations[0]}"
            + (f" (it holds {', '.join(random)})" if random else "")
            + ". No optimized model can be verified against it. Give inputs that make it deterministic (for a "
            "sampling model, noise scales of 0), or skip verification (--no-verify)."
        )

    def score(self, candidate: ir.Model) -> float:
        """Budget score of ``candidate`` (<= 1: within budget)."""
        return self.check(candidate)[1].score(self.budget)

    def latency(self, candidates: list[ir.Model], runs: int = 20) -> list[float]:
        """Median latency (ms) of each candidate on the first verification batch, timed interleaved."""
        sessions = {str(i): self._timing_session(m) for i, m in enumerate(candidates)}
        timed = runtime.interleaved_latency(sessions, self._timing_feeds(), warmup=3, runs=runs)
        return [timed[str(i)].median_ms for i in range(len(candidates))]

    def latency_ratio(self, candidate: ir.Model, min_runs: int = 20) -> float:
        """Median latency of ``candidate`` over the reference's (:func:`runtime.sized_latency`).

        For a decoder with a KV cache, the ratio of one generation: the prompt, then as many decode steps (one token
        after the prompt's cache) as the prompt has tokens. Generation spends most of its time in decode steps,
        which 4-bit weights speed up most, while a long prompt may run a little slower; the prompt alone would
        judge the wrong part, and the worse of the two would refuse a model that generates twice as fast.
        """
        return self.latency_ratios([candidate], min_runs)[0]

    def latency_ratios(self, candidates: Sequence[ir.Model], min_runs: int = 20) -> list[float]:
        """:meth:`latency_ratio` of each of ``candidates``, all timed in one interleaved series with the reference:
        two candidates compared with each other (a lossy step's output and the model without it) are then measured
        under the same conditions, and the reference runs once for both."""
        names = [f"candidate {i}" for i in range(len(candidates))]
        sessions = {"reference": self._timing_reference()}
        sessions.update({name: self._timing_session(m) for name, m in zip(names, candidates, strict=True)})
        timed = runtime.sized_latency_of(sessions, self._timing_feeds(), min_runs=min_runs)
        self._last_timed = (candidates[0], {"reference": timed["reference"], "optimized": timed[names[0]]})
        ratios: list[float] = []
        # the first candidate's decode step last: it is the one the report reuses (:meth:`timed_decode`)
        for name, candidate in reversed(list(zip(names, candidates, strict=True))):
            ratio = timed[name].median_ms / timed["reference"].median_ms
            steps = self._time_step(
                candidate, lambda ref, cand, feeds: runtime.sized_latency(ref, cand, feeds, min_runs=min_runs)
            )
            if steps is not None:
                ids = token_ids(self._timing_feeds())
                n = ids.shape[1] if ids is not None else 1
                ratio = (timed[name].median_ms + n * steps["optimized"].median_ms) / (
                    timed["reference"].median_ms + n * steps["reference"].median_ms
                )
            ratios.insert(0, ratio)
        return ratios

    def timed(self, candidate: ir.Model, runs: int) -> dict[str, runtime.Latency]:
        """The reference's and ``candidate``'s latency ("reference", "optimized"), timed interleaved.

        The latency budget's last timing of this same model is the answer when there is one: the
        report then gives one figure, not two measurements of one model that differ by noise.
        """
        if self._last_timed is not None and self._last_timed[0] is candidate:
            return self._last_timed[1]
        sessions = {"reference": self._timing_reference(), "optimized": self._timing_session(candidate)}
        return runtime.interleaved_latency(sessions, self._timing_feeds(), runs=runs)

    def timed_decode(self, candidate: ir.Model, runs: int) -> dict[str, runtime.Latency] | None:
        """A decoder's one-token step after the first verification batch's KV cache, timed like :meth:`timed`
        (the latency budget's timing of this same model, when there is one); None when the model has no KV cache
        to feed back (:func:`decode_feeds`) or ORT refuses the step."""
        if self._last_decode is not None and self._last_decode[0] is candidate:
            return self._last_decode[1]
        return self._time_step(
            candidate,
            lambda ref, cand, feeds: runtime.interleaved_latency(
                {"reference": ref, "optimized": cand}, feeds, runs=runs
            ),
        )

    def _time_step(
        self, candidate: ir.Model, timer: Callable[[ort.InferenceSession, ort.InferenceSession, Batch], Timings]
    ) -> Timings | None:
        """``timer(reference, candidate, feeds)`` on one decode step after the first verification batch's cache,
        kept for the report; None without a KV cache, or when ONNX Runtime refuses the step (e.g. ORT 1.31 reusing
        a prompt-sized buffer for one token on a float16 GenAI export). The step's inputs are made once, and the
        input model runs the step once then: when it refuses, no step is timed again (said once, not per trial)."""
        try:
            if self._decode is None:
                self._decode = (None,)  # until made: a refusal here holds for every candidate
                feeds = decode_feeds(self._timing_reference(), self._timing_feeds())
                if feeds is not None:
                    self._timing_reference().run(None, feeds)
                self._decode = (feeds,)
            feeds = self._decode[0]
            if feeds is None:
                return None
            steps = timer(self._timing_reference(), self._timing_session(candidate), feeds)
        except (DataError, RuntimeError, ort.capi.onnxruntime_pybind11_state.Fail) as exc:
            logger.warning("the decode step was not timed: ONNX Runtime refused it (%s)", str(exc).splitlines()[0])
            return None
        self._last_decode = (candidate, steps)
        return steps

    def timing_shapes(self) -> dict[str, list[int]]:
        """The input shapes latency is measured with (the first verification batch)."""
        return {name: list(np.shape(array)) for name, array in self._timing_feeds().items()}

    # Timing sessions do not spin-wait (see runtime.create_session), nor do verification's: the reference's
    # verification session times it too.
    def _timing_session(self, model: ir.Model) -> ort.InferenceSession:
        """The timing session of ``model``, opened once while it is the model timed (prompt, then decode step)."""
        if self._timing_cand is None or self._timing_cand[0] is not model:
            self._timing_cand = (model, open_candidate(model, self.device, self.threads, spinning=False))
        return self._timing_cand[1]

    def _timing_reference(self) -> ort.InferenceSession:
        return self.ref_session

    def _timing_feeds(self) -> dict[str, np.ndarray]:
        return next(iter(self._batches()))

    def _batches(self) -> Iterable[Batch]:
        """The verification batches, read and checked once for every trial while they fit in
        :data:`CACHED_BYTES`; a larger verification set is streamed each time instead."""
        if self._cached is None:
            kept, size = [], 0
            for batch in iter_batches(self.data, self.specs):
                size += sum(np.asarray(a).nbytes for a in batch.values())
                if size > CACHED_BYTES:
                    self._cached = ()  # too large to keep: stream
                    break
                kept.append(batch)
            else:
                self._cached = kept
        return self._cached if self._cached else iter_batches(self.data, self.specs)
