"""Find LoRA branches an exporter left in the graph and fold each into its base weight.

What torch exports for a LoRA layer (PEFT or hand-written, dynamo or TorchScript)::

    x ──> base op (MatMul | Gemm | Conv | MatMulNBits | MatMulBnb4 | ... -> [+ bias] -> [Split])
    └──> [Identity | no-op Cast | eval Dropout] -> A -> [* s] -> B -> [* s] ──> Add(base, ·)

A and B are MatMul or Gemm (PEFT's Conv LoRA: a Conv like the base, then a 1×1 Conv);
the scale may be folded into A or B, the Add's operands may come in either order and the
bias Add may sit before or after it. The match is an onnxscript rewrite rule on ``Add``
whose check says why an Add is not a LoRA sum; the rewrite adds ``s·A·B`` to the base
weight (in the layout the base op reads) and hands the Add's readers the base output.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, RewriteRuleSet

from graphopt.passes.edit import single_reader
from graphopt.passes.lora.targets import (
    Target,
    WeightOpener,
    add_delta,
    attr,
    const_array,
    constant_shape,
    find_target,
    is_default_domain,
    is_wrapper,
    remove_dead,
    strip_wrappers,
)

logger = logging.getLogger(__name__)

_STEP_OPS = ("MatMul", "Gemm", "Conv")
_CONV_ATTRS = ("strides", "pads", "dilations", "auto_pad")
# A branch ending in one of these beside a base op is worth a debug line when it is left alone.
_NEAR_OPS = frozenset({"Mul", "Div", "MatMul", "Gemm", "Conv", "Cast", "Identity"})


@dataclass
class Branch:
    """One LoRA branch: the down (A) and up (B) projections, their matrices and scale."""

    x: ir.Value
    down: ir.Node
    up: ir.Node
    a: np.ndarray  # [in, r] (Conv: [r, in, *k])
    b: np.ndarray  # [r, out] (Conv: [out, r, 1, ...])
    scale: float
    output: ir.Value

    @property
    def conv(self) -> bool:
        return self.down.op_type == "Conv"

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the effective delta: [in, out], or the Conv kernel's."""
        return (self.b.shape[0], *self.a.shape[1:]) if self.conv else (self.a.shape[0], self.b.shape[1])

    def delta(self) -> np.ndarray:
        """``scale·A·B`` in the effective layout (float64)."""
        a, b = self.a.astype(np.float64), self.b.astype(np.float64)
        if not self.conv:
            return self.scale * (a @ b)
        flat = b.reshape(b.shape[0], b.shape[1]) @ a.reshape(a.shape[0], -1)
        return self.scale * flat.reshape(self.shape)


@dataclass
class Plan:
    """A matched LoRA sum: the branch, the base op it merges into and the value that replaces the sum."""

    target: Target
    branch: Branch
    base: ir.Value


def _scalar(node: ir.Node) -> tuple[float, ir.Value] | str:
    """(factor, chain input) of a Mul or Div by a constant scalar."""
    # A scalar of rank <= 1 broadcasts without changing the branch's shape.
    consts = [c if c is not None and c.size == 1 and c.ndim <= 1 else None for c in map(const_array, node.inputs)]
    if node.op_type == "Div":
        if consts[1] is None or const_array(node.inputs[0]) is not None:
            return f"Div {node.name} does not divide by a constant scalar"
        return 1.0 / float(consts[1].reshape(-1)[0]), node.inputs[0]  # type: ignore[return-value]
    known = [i for i, c in enumerate(consts) if c is not None]
    if len(known) != 1:
        return f"Mul {node.name} is not a product with a constant scalar (a runtime LoRA scale is not merged)"
    return float(consts[known[0]].reshape(-1)[0]), node.inputs[1 - known[0]]  # type: ignore[union-attr,return-value]


def _step(node: ir.Node) -> np.ndarray | str:
    """The matrix of one LoRA projection ([in, out] for MatMul/Gemm, the kernel for Conv)."""
    weight = const_array(node.inputs[1] if len(node.inputs) > 1 else None)
    if weight is None:
        return f"{node.op_type} {node.name} has no constant weight"
    bias = const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
    has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
    if has_bias and (bias is None or np.any(bias)):
        return f"{node.op_type} {node.name} has a bias (a LoRA projection has none)"
    if node.op_type == "MatMul":
        return weight if weight.ndim == 2 else f"MatMul {node.name} weight has rank {weight.ndim}"
    if node.op_type == "Gemm":
        if attr(node, "transA", 0):
            return f"Gemm {node.name} has transA=1"
        alpha = float(attr(node, "alpha", 1.0))  # type: ignore[arg-type]
        return alpha * (weight.T if attr(node, "transB", 0) else weight)
    return weight if attr(node, "group", 1) == 1 else f"Conv {node.name} is grouped"


def walk_branch(value: ir.Value, dtype: ir.DataType | None) -> Branch | str:
    """Follow a LoRA branch back from the Add operand ``value`` to the input it reads."""
    scale, steps = 1.0, []
    current = value
    while len(steps) < 2:
        node = current.producer()
        if node is None or not is_default_domain(node):
            return f"{current.name} is not computed by a LoRA branch"
        if single_reader(current) is None:
            return f"{current.name} has readers outside the branch"
        if is_wrapper(node, dtype):
            current = node.inputs[0]  # type: ignore[assignment]
            continue
        if node.op_type in ("Mul", "Div"):
            factor = _scalar(node)
            if isinstance(factor, str):
                return factor
            scale *= factor[0]
            current = factor[1]
            continue
        if node.op_type not in _STEP_OPS:
            return f"{node.op_type} {node.name} is not part of a LoRA branch"
        matrix = _step(node)
        if isinstance(matrix, str):
            return matrix
        steps.append((node, matrix))
        current = node.inputs[0]  # type: ignore[assignment]
    (up, b), (down, a) = steps
    if up.op_type == "Conv" or down.op_type == "Conv":
        problem = _conv_problem(down, up, a, b)
    else:
        problem = None if a.shape[1] == b.shape[0] else f"LoRA A {a.shape} and B {b.shape} do not chain"
    return problem or Branch(current, down, up, a, b, scale, value)


def _conv_problem(down: ir.Node, up: ir.Node, a: np.ndarray, b: np.ndarray) -> str | None:
    """PEFT's Conv LoRA: A has the base kernel, B is 1×1 with unit stride and no padding."""
    if down.op_type != "Conv" or up.op_type != "Conv":
        return "a LoRA branch mixes Conv and MatMul projections"
    if any(d != 1 for d in b.shape[2:]) or b.shape[1] != a.shape[0]:
        return f"LoRA B kernel {b.shape} is not a 1×1 Conv after A {a.shape}"
    strides, pads = attr(up, "strides") or (), attr(up, "pads") or ()
    if any(s != 1 for s in strides) or any(pads):  # type: ignore[union-attr]
        return f"LoRA B Conv {up.name} has strides or padding"
    return None


def _conv_matches(base: ir.Node, down: ir.Node) -> bool:
    """The A Conv must see the input exactly as the base Conv does."""
    return all(attr(base, name) == attr(down, name) for name in _CONV_ATTRS)


@dataclass
class BranchMerger:
    """Plans and applies the merge of LoRA branches; collects what it did.

    Attributes:
        opener: Opens a target's weight for writing (or says why not); quantized targets
            get a re-quantizing access, or a reason when their branch is to be kept.
        merged: Branches merged, per kind of base op.
        skipped: Why near-miss branches were left, with a count per reason.
    """

    opener: WeightOpener
    merged: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    changed: list[str] = field(default_factory=list)
    requantization: dict[str, dict[str, float]] = field(default_factory=dict)
    plans: list[Plan] = field(default_factory=list)

    def plan(self, left: ir.Value, right: ir.Value) -> Plan | str:
        """A merge plan for ``Add(left, right)``, trying both operands as the branch."""
        near = []
        for base, branch in ((left, right), (right, left)):
            try:
                plan = self._plan(base, branch)
            except (ValueError, IndexError, TypeError, KeyError) as exc:  # an odd graph is left alone, not a crash
                logger.debug("merge_lora: could not analyse Add(%s, %s): %r", left.name, right.name, exc)
                plan = f"could not analyse the operands ({type(exc).__name__})"
            if isinstance(plan, Plan):
                return plan
            producer = branch.producer()
            if not plan.startswith("base:") and producer is not None and producer.op_type in _NEAR_OPS:
                near.append(plan)
        for reason in near:
            logger.debug("merge_lora: left a LoRA-like Add alone: %s", reason)
            self.skipped[reason] += 1
        return "; ".join(near) or "neither operand is a LoRA branch beside a base op"

    def _plan(self, base: ir.Value, branch_value: ir.Value) -> Plan | str:
        target = find_target(base)
        if isinstance(target, str):
            return f"base: {target}"
        if single_reader(base) is None:
            return f"base: {base.name} has readers besides the LoRA sum"
        branch = walk_branch(branch_value, target.dtype)
        if isinstance(branch, str):
            return branch
        if strip_wrappers(branch.x, target.dtype) is not strip_wrappers(target.x, target.dtype):
            return f"the branch {branch.down.name} reads another input than {target.describe()}"
        problem = self._shape_problem(target, branch)
        if problem:
            return problem
        problem = self.opener.problem(target)
        return problem if problem else Plan(target, branch, base)

    @staticmethod
    def _shape_problem(target: Target, branch: Branch) -> str | None:
        if target.kind.startswith("conv"):
            if not branch.conv or not _conv_matches(target.node, branch.down):
                return f"the LoRA Conv {branch.down.name} does not match the base Conv {target.node.name}"
            dequant = target.weight.producer() if target.kind.endswith("_dq") else None
            expected = constant_shape(dequant.inputs[0] if dequant is not None else target.weight)  # type: ignore[assignment]
        elif branch.conv:
            return f"a Conv LoRA branch on {target.describe()}"
        else:
            start, stop = target.columns or (0, target.out_features)
            expected = (target.in_features, stop - start)
        if branch.shape != expected:
            return f"the LoRA delta {branch.shape} does not fit {target.describe()} {expected}"
        return None

    def apply(self, plan: Plan) -> ir.Value:
        """Fold the plan's delta into its base weight; return the value that replaces the sum."""
        access = self.opener.open(plan.target)
        assert not isinstance(access, str), access  # plan() opened it a moment ago
        stats = add_delta(access, plan.target, plan.branch.delta(), 1.0)
        self.merged[plan.target.kind] += 1
        self.changed.extend(access.changed())
        if stats:
            self.requantization[", ".join(access.changed())] = stats
        self.plans.append(plan)
        return plan.base

    def cleanup(self, graph: ir.Graph) -> int:
        """Remove the merged branches and PEFT's no-op Cast after each sum."""
        seeds = [p.branch.output.producer() for p in self.plans]
        removed = remove_dead(graph, [s for s in seeds if s is not None])
        for plan in self.plans:
            reader = single_reader(plan.base)
            if reader is None or reader.op_type != "Cast" or not is_wrapper(reader, plan.target.dtype):
                continue
            if reader.outputs[0].is_graph_output():
                continue
            reader.outputs[0].replace_all_uses_with(plan.base)
            removed += remove_dead(graph, [reader])
        return removed


class MergeLoraBranchRule(RewriteRuleClassBase):
    """``Add(base, LoRA branch)`` -> ``base`` with ``s·A·B`` folded into the base weight."""

    def __init__(self, merger: BranchMerger) -> None:
        super().__init__("MergeLoraBranch")
        self._merger = merger
        self._plan: Plan | None = None

    def pattern(self, op: object, left: ir.Value, right: ir.Value) -> object:
        return op.Add(left, right)  # type: ignore[attr-defined]

    def check(self, context: object, left: ir.Value, right: ir.Value) -> MatchResult:
        result = MatchResult()
        plan = self._merger.plan(left, right)
        if isinstance(plan, str):
            return result.fail(plan)
        self._plan = plan
        return result

    def rewrite(self, op: object, left: ir.Value, right: ir.Value) -> ir.Value:
        assert self._plan is not None
        plan, self._plan = self._plan, None
        return self._merger.apply(plan)


def merge_branches(model: ir.Model, merger: BranchMerger) -> int:
    """Merge every LoRA branch of the model's graphs; returns how many were merged."""
    count = RewriteRuleSet([MergeLoraBranchRule.rule(merger)]).apply_to_model(model)
    if count:
        merger.cleanup(model.graph)
    return count
