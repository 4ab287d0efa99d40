"""What graphopt checks in a model right after loading it, before any pass sees it.

A model can be valid ONNX and still be one graphopt cannot work on: an op neither ONNX Runtime
nor onnx knows. Found here, it is a user error naming the node; found later, it would fail inside
a pass or at save and be blamed on graphopt. String tables (labels, vocabularies) are kept as
they are: the passes change numeric weights only, and verification compares string outputs for
equality. Nodes out of topological order, which ONNX Runtime accepts,
are put in order instead.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import onnx
import onnx_ir as ir
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from graphopt.errors import ModelLoadError
from graphopt.passes.edit import all_nodes

logger = logging.getLogger(__name__)


def check_model(model: ir.Model, path: Path) -> None:
    """Raise :class:`ModelLoadError` naming what graphopt cannot handle; sort unsorted graphs in place."""
    _check_ops(model, path)
    if not _sorted(model):
        ir.passes.common.TopologicalSortPass()(model)
        logger.info("%s: put the nodes in topological order (ONNX Runtime accepts them unsorted)", path)


@functools.cache
def known_ops() -> frozenset[tuple[str, str]]:
    """(domain, op type) of every op ONNX Runtime or onnx defines; ORT's own ops included."""
    ops = {(s.domain, s.name) for s in ort_state.get_all_operator_schema()}
    ops |= {(s.domain, s.name) for s in onnx.defs.get_all_schemas_with_history()}
    return frozenset(ops)


def _check_ops(model: ir.Model, path: Path) -> None:
    local = {(domain, name) for domain, name, _ in model.functions}
    for node in all_nodes(model):
        domain = "" if node.domain == "ai.onnx" else node.domain
        if (domain, node.op_type) not in known_ops() and (node.domain, node.op_type) not in local:
            where = f"node {node.name!r}" if node.name else "a node"
            raise ModelLoadError(
                f"{path}: {where} uses op {node.op_type!r} of domain {domain or 'ai.onnx'!r}, which neither ONNX "
                f"Runtime nor onnx knows. Replace it with standard ops, or export the model without the custom op."
            )


def _sorted(model: ir.Model) -> bool:
    """Whether every node of every graph comes after the nodes that produce its inputs."""
    for graph in model.graphs():
        seen: set[ir.Node] = set()
        for node in graph:
            producers = (v.producer() for v in node.inputs if v is not None)
            if any(p is not None and p.graph is graph and p not in seen for p in producers):
                return False
            seen.add(node)
    return True
