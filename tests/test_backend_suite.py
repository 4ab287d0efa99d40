"""ONNX's own backend node tests through ``fold``: every case ORT runs before must still pass.

The suite (bench/peer_suite.py) generates the ~1900 node test cases shipped with the onnx
package, keeps the ~1400 that ONNX Runtime reproduces at baseline and checks each after
``graphopt.io.load_model`` and the fold pass. About 30 s on one core.
"""

from __future__ import annotations

import pytest

from bench.peer_suite import SuiteResult, run_suite
from graphopt.passes.fold.constants import FoldConfig, FoldConstantsPass

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


@pytest.fixture(scope="module")
def fold_suite() -> SuiteResult:
    return run_suite(lambda: FoldConstantsPass(FoldConfig()), name="fold", exclude=NONDETERMINISTIC)


# One test, not three: under pytest-xdist each worker that picks up a test of this module
# would rebuild the module fixture and run the whole suite again.
@pytest.mark.slow
def test_fold_keeps_every_backend_case_passing(fold_suite: SuiteResult) -> None:
    assert fold_suite.ran > MIN_RAN, f"only {fold_suite.ran} cases ran at baseline: {fold_suite.counts}"
    failing = [f"{r.name} [{r.status}] {r.error}" for r in fold_suite.failures]
    if failing:
        pytest.fail(f"{len(failing)} of {fold_suite.ran} cases broke after fold:\n" + "\n".join(failing), pytrace=False)
    assert fold_suite.modified > MIN_MODIFIED, f"fold modified only {fold_suite.modified} of {fold_suite.ran} cases"
