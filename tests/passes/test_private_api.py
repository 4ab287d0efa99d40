"""The private onnxscript/onnx_ir names fold relies on still exist and behave as fold assumes.

An upgrade that moves one of them fails here, naming it, instead of somewhere inside a fold.
"""

from __future__ import annotations

import onnx_ir.passes.common as common_passes
from onnxscript import rewriter

from graphopt.passes.fold import private_api


def test_default_rule_list_is_there() -> None:
    rules = private_api.default_rules()
    assert len(rules) > 20 and all(isinstance(r, rewriter.RewriteRule) for r in rules)


def test_most_rules_have_a_fixed_root_op() -> None:
    roots = [private_api.rule_root(r) for r in private_api.default_rules()]
    fixed = [r for r in roots if r is not None]
    # if onnxscript renames _target_pattern, every root is None and fold silently gets 4x slower
    assert len(fixed) >= len(roots) // 2, "RewriteRule._target_pattern no longer gives a rule's root op"
    assert ("BatchNormalization", "") in fixed or any(op == "BatchNormalization" for op, _ in fixed)


def test_a_filtered_rule_keeps_the_rule() -> None:
    rule = next(r for r in private_api.default_rules() if private_api.rule_root(r) is not None)
    filtered = private_api.RootFilteredRule(rule, private_api.rule_root(rule))  # type: ignore[arg-type]
    assert filtered.name == rule.name and hasattr(filtered, "_target_pattern")


def test_identity_elimination_hook_is_there() -> None:
    assert callable(getattr(common_passes.IdentityEliminationPass, "_try_eliminate_identity_node", None))


def test_a_rule_names_the_ops_its_root_inputs_come_from() -> None:
    """The Conv+Add fusion needs an Add fed by a Conv: the filter skips any other Add without matching."""
    from graphopt.passes.fold.rules import channel_affine_rules

    rules = channel_affine_rules()
    required = {private_api.input_producers(rule) for rule in rules}
    assert ((0, "Conv", ""),) in required and ((1, "Conv", ""),) in required  # both operand orders
    assert ((0, "ConvTranspose", ""),) in required


def test_the_dispatcher_keeps_what_the_rule_set_reads_from_a_rule() -> None:
    """RewriteRuleSet reads remove_nodes, as_function, name and the visitors from the rule it calls."""
    import pytest

    from graphopt.passes.fold import optimizer

    dispatchers = optimizer.dispatched_rules()
    assert [d.remove_nodes for d in dispatchers] == [True, False]
    assert all(not d.as_function and d.name == "" for d in dispatchers)
    rules = optimizer.default_rules()
    with pytest.raises(ValueError, match="remove_nodes"):
        private_api.OpDispatchRule(rules, remove_nodes=True)  # the layout rules keep their matched nodes
    conv_add = dispatchers[0]._by_root[("Add", "")]
    assert conv_add and all(private_api.rule_root(r) == ("Add", "") for r in conv_add)
    assert rewriter.RewriteRuleSet(dispatchers).remove_unused_nodes  # the set still cleans up after them
