"""Every use of onnxscript's and onnx_ir's private names, in one place.

graphopt uses their public API everywhere else. What is here has no public form yet:

- onnxscript's default rewrite rule list (``rewriter._DEFAULT_REWRITE_RULES``);
- the root op of a rule's pattern (``RewriteRule._target_pattern``), to try each rule only on
  nodes of that op type (three quarters of fold's time on the zoo transformer otherwise), and
  the ops its root's inputs must come from (pattern IR internals: ``NodePattern.op._value``);
- onnx_ir's ``IdentityEliminationPass._try_eliminate_identity_node``, to keep it from merging
  two graph outputs.

``tests/passes/test_private_api.py`` checks each name and shape on the installed versions, so
an upgrade that moves one fails there, loudly, and not deep inside a fold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import rewriter


def default_rules() -> Sequence[rewriter.RewriteRule]:
    """onnxscript's default rewrite rules (what ``onnxscript.optimizer.optimize`` applies)."""
    return rewriter._DEFAULT_REWRITE_RULES


def _fixed_op(node_pattern: Any) -> tuple[str, str] | None:
    op, domain = getattr(node_pattern.op, "_value", None), getattr(node_pattern.domain, "_value", None)
    if not isinstance(op, str) or not isinstance(domain, str):
        return None
    return op, "" if domain == "ai.onnx" else domain


def rule_root(rule: rewriter.RewriteRule) -> tuple[str, str] | None:
    """(op type, domain) of a single-output pattern's root node, when fixed."""
    pattern = getattr(rule, "_target_pattern", None)
    if pattern is None or not pattern.has_single_output_node:
        return None
    return _fixed_op(pattern.output_nodes[0])


def input_producers(rule: rewriter.RewriteRule) -> tuple[tuple[int, str, str], ...]:
    """(input index, op type, domain) of every root input the pattern requires a fixed op to produce."""
    pattern = getattr(rule, "_target_pattern", None)
    if pattern is None or not pattern.has_single_output_node:
        return ()
    required = []
    for index, value in enumerate(pattern.output_nodes[0].inputs):
        producer = value.producer() if value is not None and hasattr(value, "producer") else None
        fixed = _fixed_op(producer) if producer is not None else None
        if fixed is not None:
            required.append((index, *fixed))
    return tuple(required)


class RootFilteredRule(rewriter.RewriteRule):
    """A rule that skips nodes whose op type cannot be its pattern's root, or whose inputs' producers cannot match.

    The second test is what makes fold near-linear on long graphs: an Add tried by the dozen
    Conv-and-Add fusion rules is rejected by one look at its inputs' producers, not by the matcher.
    """

    def __init__(self, rule: rewriter.RewriteRule, root: tuple[str, str]) -> None:
        self.__dict__.update(rule.__dict__)  # a copy of the rule: RewriteRule has no copy API
        self._root = root
        self._producers = input_producers(rule)

    def try_rewrite(self, model: ir.Model, graph_or_function: Any, node: ir.Node, **kwargs: Any) -> Any:
        if node.op_type != self._root[0] or (node.domain or "") != self._root[1]:
            return None
        inputs = node.inputs
        for index, op, domain in self._producers:
            value = inputs[index] if index < len(inputs) else None
            producer = value.producer() if value is not None else None
            if producer is None or producer.op_type != op or (producer.domain or "") != domain:
                return None
        return super().try_rewrite(model, graph_or_function, node, **kwargs)


class IdentityEliminationPass(common_passes.IdentityEliminationPass):
    """onnx_ir's pass, except ``b = Identity(a)`` with both graph outputs (it would merge them)."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        source = node.inputs[0] if node.op_type == "Identity" and node.inputs else None
        if source is not None and source.is_graph_output() and node.outputs[0].is_graph_output():
            return False
        return super()._try_eliminate_identity_node(node)


class OpDispatchRule(rewriter.RewriteRule):
    """Several rules as one, tried in their order on a node only when their root op is the node's.

    ``RewriteRuleSet`` calls every rule on every node: 67 rules on a 15k-node graph are 1.34M
    calls, a quarter of fold's time. This rule looks the node's op up once. The set reads a
    matched rule's ``remove_nodes`` from the rule it called, so every rule given here must
    agree on it (build one dispatcher per value). It relies on what ``RewriteRuleSet`` reads
    from a rule (``try_rewrite``, ``name``, ``remove_nodes``, ``as_function`` and the graph
    visitors), tested in tests/passes/test_private_api.py.
    """

    def __init__(self, rules: Sequence[rewriter.RewriteRule], *, remove_nodes: bool) -> None:
        if any(rule.remove_nodes != remove_nodes for rule in rules) or any(rule.as_function for rule in rules):
            raise ValueError("OpDispatchRule: every rule must have the given remove_nodes and no as_function")
        self.name = ""  # the rule-name metadata of rewritten nodes stays empty
        self.remove_nodes, self.as_function = remove_nodes, False
        self._rules = list(rules)
        roots = [rule_root(rule) for rule in self._rules]
        # A rule with no fixed root runs on every node, in its place in the order.
        self._anywhere = [rule for rule, root in zip(self._rules, roots, strict=True) if root is None]
        self._by_root: dict[tuple[str, str], list[rewriter.RewriteRule]] = {}
        for key in {root for root in roots if root is not None}:
            self._by_root[key] = [r for r, root in zip(self._rules, roots, strict=True) if root in (key, None)]
        visitors = [r.graph_pre_visitor for r in self._rules if r.graph_pre_visitor]
        finishers = [r.graph_post_visitor for r in self._rules if r.graph_post_visitor]
        self.graph_pre_visitor = (lambda: [v() for v in visitors]) if visitors else None
        self.graph_post_visitor = (lambda: [v() for v in finishers]) if finishers else None

    def try_rewrite(self, model: ir.Model, graph_or_function: Any, node: ir.Node, **kwargs: Any) -> Any:
        for rule in self._by_root.get((node.op_type, node.domain or ""), self._anywhere):
            delta = rule.try_rewrite(model, graph_or_function, node, **kwargs)
            if delta is not None:
                return delta
        return None
