"""ONNX's own backend node tests through every exact pass: every case ORT runs before must still pass.

The exact passes that need no data come from the registry (fold, merge_lora, unmerge_lora: a
new one is covered when it is registered). The suite (tests/harness/peer_suite.py) generates
the ~1900 node test cases shipped with the onnx package, keeps the ~1400 that ONNX Runtime
reproduces at baseline and checks each after ``graphopt.io.load_model`` and the pass. About 30 s per pass on one core.
"""

from __future__ import annotations

import pytest

from graphopt import registry
from tests.harness.peer_suite import SuiteResult, run_suite

# Floors well under what was measured (onnx 1.23.2, ORT 1.31.1: 1884 cases, 1424 ran,
# ~375 modified) so an onnx/ORT upgrade does not trip them, but a harness that silently
# stopped feeding cases to ORT, or a fold pass that stopped folding, does.
MIN_RAN = 1300
MIN_MODIFIED = 250

# Cases whose expected outputs ORT could match only by luck (random ops, unspecified
# output order) would go here, name -> one-line reason. None is needed today: the random
# ops (Bernoulli, RandomUniformLike, training-mode Dropout) already fail at baseline and are
# counted as ort_unsupported, and the remaining Dropout cases are deterministic (ratio 0 or
# inference mode).
NONDETERMINISTIC: dict[str, str] = {}


NEEDS_FILES = {"unmerge_lora": "needs the adapter folders that were merged"}
EXACT = [
    name
    for name, spec in registry.REGISTRY.items()
    if spec.exact and not spec.needs_calibration and name not in NEEDS_FILES
]


def _suite(name: str) -> SuiteResult:
    spec = registry.get_spec(name)
    return run_suite(lambda: spec.build(spec.config_type()()), name=name, exclude=NONDETERMINISTIC)


# One test per pass, each running its suite once: under pytest-xdist a module fixture would be
# rebuilt by every worker that picks up a test of this module.
@pytest.mark.slow
@pytest.mark.parametrize("name", EXACT)
def test_exact_pass_keeps_every_backend_case_passing(name: str) -> None:
    suite = _suite(name)
    assert suite.ran > MIN_RAN, f"only {suite.ran} cases ran at baseline: {suite.counts}"
    failing = [f"{r.name} [{r.status}] {r.error}" for r in suite.failures]
    if failing:
        pytest.fail(f"{len(failing)} of {suite.ran} cases broke after {name}:\n" + "\n".join(failing), pytrace=False)
    if name == "fold":  # the other exact passes change nothing without adapters or branches
        assert suite.modified > MIN_MODIFIED, f"fold modified only {suite.modified} of {suite.ran} cases"
