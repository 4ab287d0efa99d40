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

from graphopt.passes.fold import private_api


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


def default_rules() -> list[rewriter.RewriteRule]:
    """onnxscript's default rules (BatchNorm fusion included), each filtered by its root op."""
    filtered = []
    for rule in private_api.default_rules():
        root = private_api.rule_root(rule)
        filtered.append(private_api.RootFilteredRule(rule, root) if root is not None else rule)
    return filtered


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
            rewriter.RewritePass(rewriter.RewriteRuleSet(default_rules())),
            common_passes.RemoveUnusedNodesPass(),
            common_passes.RemoveUnusedFunctionsPass(),
            common_passes.RemoveUnusedOpsetsPass(),
        ],
        steps=iterations,
        early_stop=True,
    )
    passes: list[ir.passes.PassBase] = [
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
