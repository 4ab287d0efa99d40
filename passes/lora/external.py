"""Merge PEFT adapter updates into an ONNX model exported from the base model without LoRA.

PEFT names a module by its torch path (``layers.0.attn.q_proj``). The ONNX graph keeps that
path in one of three places, tried in this order for each weighted op:

1. dynamo exporter: node metadata ``pkg.torch.onnx.name_scopes`` (initializers are renamed
   ``val_N`` and pre-transposed, so the names say nothing);
2. TorchScript exporter: the node name ``/layers.0/attn/q_proj/MatMul``;
3. the weight initializer's name, ``layers.0.attn.q_proj.weight`` (or ``...weight.T``).

A PEFT module matches an ONNX module of the same path, or one whose dotted path ends
with it (PEFT on a BERT inside a wrapper module sees ``encoder...`` where the export says
``bert.encoder...``). A mapping (PEFT module -> initializer or node name) overrides both.
"""

from __future__ import annotations

import ast
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from graphopt.errors import DataError
from graphopt.passes.lora.adapters import LoraFactors
from graphopt.passes.lora.targets import Target, WeightOpener, add_delta, locate_weight, target_of_node

logger = logging.getLogger(__name__)

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_WRAPPER_SUFFIXES = (".base_layer",)


def module_names(target: Target) -> list[str]:
    """The torch module paths the exporters left for ``target``'s op (see the module docstring)."""
    node, names = target.node, []
    scopes = node.metadata_props.get(SCOPES_KEY)
    if scopes:
        try:
            parsed = ast.literal_eval(scopes)
        except (ValueError, SyntaxError):
            parsed = []
        if isinstance(parsed, list) and len(parsed) >= 2 and parsed[-2]:
            names.append(str(parsed[-2]))
    if node.name and node.name.startswith("/") and node.name.count("/") >= 2:
        names.append(".".join(node.name.split("/")[1:-1]))
    located = locate_weight(target) if not target.quantized else None
    init = located[0].name if isinstance(located, tuple) else None
    if init and ".weight" in init:
        names.append(init[: init.rindex(".weight")])
    return list(dict.fromkeys(_unwrap(n) for n in names if n))


def _unwrap(name: str) -> str:
    for suffix in _WRAPPER_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def weighted_targets(graph: ir.Graph) -> list[Target]:
    """Every op of the graph (and its subgraphs) that could absorb a LoRA delta."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(graph):
        target = target_of_node(node)
        if not isinstance(target, str):
            found.append(target)
    return found


def resolve(
    modules: list[str], targets: list[Target], mapping: Mapping[str, str]
) -> tuple[dict[str, Target], list[str]]:
    """(PEFT module -> target, unmatched modules); DataError for a bad mapping or an ambiguous name."""
    index: dict[str, dict[int, Target]] = {}
    by_name: dict[str, Target] = {}
    for target in targets:
        for name in module_names(target):
            index.setdefault(name, {})[id(target.node)] = target
        by_name.update({n: target for n in (target.node.name, target.weight.name) if n})
        located = locate_weight(target) if not target.quantized else None
        if isinstance(located, tuple) and located[0].name:
            by_name.setdefault(located[0].name, target)
    matched, unmatched = {}, []
    for module in modules:
        if module in mapping:
            if mapping[module] not in by_name:
                raise DataError(
                    f"merge_lora: mapping {module!r} -> {mapping[module]!r}: the model has no weighted op or "
                    "weight initializer of that name. Use a MatMul/Gemm/Conv node name or its weight's name."
                )
            matched[module] = by_name[mapping[module]]
            continue
        candidates = index.get(module) or _suffix_matches(module, index)
        if len(candidates) > 1:
            names = ", ".join(sorted(t.node.name or t.weight.name or "?" for t in candidates.values()))
            raise DataError(
                f"merge_lora: module {module!r} matches several ops ({names}). Map it with mapping / mapping_file."
            )
        if candidates:
            matched[module] = next(iter(candidates.values()))
        else:
            unmatched.append(module)
    return matched, unmatched


def _suffix_matches(module: str, index: Mapping[str, dict[int, Target]]) -> dict[int, Target]:
    found: dict[int, Target] = {}
    for name, targets in index.items():
        if name.endswith("." + module) or module.endswith("." + name):
            found.update(targets)
    return found


def unmatched_error(unmatched: list[str], targets: list[Target]) -> DataError:
    """The error for adapter modules the model has no op for, with the names it does have."""
    known = sorted({n for t in targets for n in module_names(t)})
    shown = ", ".join(known[:12]) + (f", ... ({len(known)} in all)" if len(known) > 12 else "")
    return DataError(
        f"merge_lora: {len(unmatched)} adapter module(s) match no op of the model: {', '.join(unmatched)}. "
        f"Modules the model names: {shown or 'none (no name scopes, node names or weight names)'}. "
        "Map them with mapping / mapping_file ({peft module: onnx node or initializer name}), "
        "or set allow_unmatched to merge the rest."
    )


# (target, factors) -> True when a float branch was inserted beside a quantized base
BranchInserter = Callable[[Target, LoraFactors], bool]


@dataclass
class ExternalMerge:
    """Adds (or, with sign -1, subtracts) per-module updates to the weights they map to."""

    opener: WeightOpener
    insert_branch: BranchInserter | None = None
    merged: Counter[str] = field(default_factory=Counter)
    changed: list[str] = field(default_factory=list)
    requantization: dict[str, dict[str, float]] = field(default_factory=dict)

    def problems(self, matched: Mapping[str, Target], factors: Mapping[str, LoraFactors]) -> dict[str, str]:
        """Why each module that cannot be merged cannot be (checked before anything changes)."""
        found = {}
        for module, target in matched.items():
            problem = _fit_problem(target, factors[module]) or self.opener.problem(target)
            keep = target.quantized and self.insert_branch is not None and (problem or "").startswith("keep")
            if problem and not keep:
                found[module] = problem
        return found

    def apply(self, matched: Mapping[str, Target], factors: Mapping[str, LoraFactors], sign: float) -> int:
        """Merge every matched module; returns how many changed the model."""
        count = 0
        for module, target in matched.items():
            if _fit_problem(target, factors[module]):
                continue
            access = self.opener.open(target)
            if isinstance(access, str):
                if self.insert_branch is None or sign < 0:
                    continue
                count += self.insert_branch(target, factors[module])
                self.merged[f"{target.kind}_float_branch"] += 1
                continue
            stats = add_delta(access, target, _effective(target, factors[module]), sign)
            self.merged[target.kind] += 1
            self.changed.extend(access.changed())
            if stats:
                self.requantization[", ".join(access.changed())] = stats
            count += 1
        return count


def _fit_problem(target: Target, factors: LoraFactors) -> str | None:
    """Why the update does not fit the target's weight, or None."""
    shape = (factors.b.shape[0], *factors.a.shape[1:])  # torch layout [out, in(, *k)]
    if target.kind.startswith("conv"):
        weight = target.weight.producer().inputs[0] if target.kind.endswith("_dq") else target.weight  # type: ignore[union-attr]
        expected = tuple(weight.shape.numpy()) if weight is not None and weight.shape is not None else None
        return None if expected == shape else f"update {list(shape)} does not fit the Conv weight {expected}"
    if len(shape) != 2:
        return f"a Conv update {list(shape)} for {target.describe()}"
    expected = (target.out_features, target.in_features)
    if shape != expected:
        return f"update [out, in] = {list(shape)} does not fit {target.describe()} {list(expected)}"
    return None


def _effective(target: Target, factors: LoraFactors) -> np.ndarray:
    """The update in the target's effective layout: [in, out] for MatMul-like ops, the Conv kernel as is."""
    delta = factors.delta()
    return delta if target.kind.startswith("conv") else delta.T
