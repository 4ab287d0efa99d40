"""onnxscript's optimizer loop, composed from its parts so fold can tune it.

The loop is the one ``onnxscript.optimizer.optimize_ir`` runs (fold constants, rewrite,
drop dead code, repeat until nothing changes; then lift, deduplicate, CSE). Two changes:
size limits and a veto hook come from fold's config, and every rewrite rule is tried only
on nodes of its root op type. onnxscript tries each of its ~46 rules on every node,
which was three quarters of fold's time on the zoo transformer.

Pinned to onnxscript 0.7: it reads ``rewriter._DEFAULT_REWRITE_RULES`` and the
``FoldConstantsPass`` class, which that release does not export.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import rewriter
from onnxscript.optimizer import _constant_folding
from onnxscript.rewriter import _rewrite_rule


class _RootFilteredRule(_rewrite_rule.RewriteRule):
    """A rule that skips nodes whose op type cannot be its pattern's root."""

    def __init__(self, rule: _rewrite_rule.RewriteRule, root: tuple[str, str]) -> None:
        self.__dict__.update(rule.__dict__)
        self._root = root

    def try_rewrite(self, model: ir.Model, graph_or_function: Any, node: ir.Node, **kwargs: Any) -> Any:
        if node.op_type != self._root[0] or (node.domain or "") != self._root[1]:
            return None
        return super().try_rewrite(model, graph_or_function, node, **kwargs)


def _root(rule: _rewrite_rule.RewriteRule) -> tuple[str, str] | None:
    """(op type, domain) of a single-output pattern's root node, when fixed."""
    pattern = getattr(rule, "_target_pattern", None)
    if pattern is None or not pattern.has_single_output_node:
        return None
    node = pattern.output_nodes[0]
    op, domain = getattr(node.op, "_value", None), getattr(node.domain, "_value", None)
    if not isinstance(op, str) or not isinstance(domain, str):
        return None
    return op, "" if domain == "ai.onnx" else domain


def default_rules() -> list[_rewrite_rule.RewriteRule]:
    """onnxscript's default rules (BatchNorm fusion included), each filtered by its root op."""
    rules: Sequence[_rewrite_rule.RewriteRule] = rewriter._DEFAULT_REWRITE_RULES
    filtered = []
    for rule in rules:
        root = _root(rule)
        filtered.append(_RootFilteredRule(rule, root) if root is not None else rule)
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
            _constant_folding.FoldConstantsPass(
                shape_inference=shape_inference,
                input_size_limit=size_limit,
                output_size_limit=size_limit,
                should_fold=should_fold,
            ),
            rewriter.RewritePass(default_rules()),
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
