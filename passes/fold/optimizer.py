"""onnxscript's optimizer loop, composed from its parts so fold can tune it.

The loop is the one ``onnxscript.optimizer.optimize_ir`` runs (fold constants, rewrite,
drop dead code, repeat until nothing changes; then lift, deduplicate, CSE). Two changes:
size limits and a veto hook come from fold's config, and every rewrite rule is tried only
on nodes of its root op type. onnxscript tries each of its ~46 rules on every node,
which was three quarters of fold's time on the zoo transformer.

The private names it still needs (the default rule list, a rule's root op) live in
:mod:`graphopt.passes.fold.private_api`, checked by a test on every upgrade.
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import rewriter
from onnxscript.optimizer import fold_constants_ir
from onnxscript.rewriter.rules import common as common_rules

from graphopt.passes.fold import private_api
from graphopt.passes.fold.defaults import DropZeroStatesPass
from graphopt.passes.fold.identity_rules import identity_rules
from graphopt.passes.fold.layout_rules import layout_rules
from graphopt.passes.fold.rules import channel_affine_rules
from graphopt.passes.fold.shape_values import ShapeValuesPass
from graphopt.passes.loops import LoopInvariantsPass


class _FoldConstants(ir.passes.InPlacePass):
    """onnxscript's constant folding (its public ``fold_constants_ir``) as a pass of the loop."""

    def __init__(self, *, shape_inference: bool, size_limit: int, should_fold: Callable[[ir.Node], bool | None]):
        super().__init__()
        self.shape_inference, self.size_limit, self.should_fold = shape_inference, size_limit, should_fold

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = fold_constants_ir(
            model,
            onnx_shape_inference=self.shape_inference,
            input_size_limit=self.size_limit,
            output_size_limit=self.size_limit,
            should_fold=self.should_fold,
        )
        return ir.passes.PassResult(model, modified=bool(result.modified))


# Exact rules of onnxscript's public rule library beyond its defaults: a constant scale and shift
# after (or before, when the Conv has no padding) a Conv go into its weights and bias, as
# BatchNorm does: Paddle and tf2onnx exports keep them as Mul/Add. Then graphopt's own
# layout and neutral-operand rules (found on the real-model corpus).
EXTRA_RULES = (
    common_rules.conv_affine_fusion_rule,
    common_rules.affine_conv_fusion_rule,
    *channel_affine_rules(),
    *layout_rules(),
    *identity_rules(),
)


# onnxscript's multi-output rules match their second output node by trying every node of the
# graph for each candidate: quadratic, 60% of fold's time on a 900-node model, and on the corpus
# they never fired (two Slices of one tensor into a Split).
_QUADRATIC_RULES = frozenset({"SlicesSplit"})


def default_rules() -> list[rewriter.RewriteRule]:
    """onnxscript's default rules (BatchNorm fusion included) and :data:`EXTRA_RULES`, filtered by root op."""
    filtered = []
    for rule in [*private_api.default_rules(), *EXTRA_RULES]:
        if rule.name in _QUADRATIC_RULES:
            continue
        root = private_api.rule_root(rule)
        filtered.append(private_api.RootFilteredRule(rule, root) if root is not None else rule)
    return filtered


def dispatched_rules() -> list[rewriter.RewriteRule]:
    """:func:`default_rules` as one dispatcher per ``remove_nodes`` value, in their order (the rules
    that keep matched nodes, all of graphopt's layout rules, come after every other rule on the ops they share)."""
    rules = default_rules()
    groups = [[r for r in rules if r.remove_nodes], [r for r in rules if not r.remove_nodes]]
    return [private_api.OpDispatchRule(g, remove_nodes=g[0].remove_nodes) for g in groups if g]


def build_optimizer(
    *,
    iterations: int,
    shape_inference: bool,
    size_limit: int,
    should_fold: Callable[[ir.Node], bool | None],
    inline: bool,
) -> ir.passes.PassBase:
    """The fold-and-rewrite loop with final cleanup, as an in-place pass."""
    loop = ir.passes.PassManager(
        [
            _FoldConstants(shape_inference=shape_inference, size_limit=size_limit, should_fold=should_fold),
            ShapeValuesPass(),
            DropZeroStatesPass(),
            LoopInvariantsPass(),
            rewriter.RewritePass(rewriter.RewriteRuleSet(dispatched_rules())),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.RemoveUnusedFunctionsPass(),
            common_passes.RemoveUnusedOpsetsPass(),
        ],
        steps=iterations,
        early_stop=True,
    )
    passes: list[ir.passes.PassBase] = [
        # Weights in Constant nodes (Paddle, older exporters) are initializers to the rewrite rules,
        # however small: an 8-channel BatchNorm's parameters are below onnx_ir's default of 16.
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0),
        loop,
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common_passes.LiftSubgraphInitializersToMainGraphPass(),
        common_passes.DeduplicateInitializersPass(),
        common_passes.CommonSubexpressionEliminationPass(),
        # Not OutputFixPass: for an output that is also an input it renames the input
        # (x -> x_orig) behind an Identity; ONNX allows the plain form, and input names must stay.
        common_passes.NameFixPass(),
    ]
    if inline:
        passes.insert(0, common_passes.InlinePass())
    return ir.passes.Sequential(*passes)
