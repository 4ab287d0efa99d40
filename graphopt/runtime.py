"""ONNX Runtime sessions: devices, the IR versions ORT accepts, and latency measurement.

A session asked for CUDA that ONNX Runtime quietly built on the CPU (missing CUDA or
cuDNN libraries) is an error here, never a CPU run reported as CUDA.
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from graphopt import serialize
from graphopt.errors import DataError, DeviceError, ModelLoadError, ModelSaveError
from graphopt.hardware import DEVICES

logger = logging.getLogger(__name__)

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

ModelSource = ir.Model | str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class Latency:
    """Latency of repeated runs, in milliseconds."""

    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int

    def to_dict(self) -> dict[str, float | int]:
        return {"median_ms": self.median_ms, "p90_ms": self.p90_ms, "min_ms": self.min_ms, "runs": self.runs}


def max_ir_version() -> int:
    """The highest ONNX IR version the installed ONNX Runtime loads (probed, not assumed)."""
    options = _session_options(threads=1, optimization="disable")
    for version in range(14, 6, -1):
        try:
            ort.InferenceSession(serialize.tiny_model_bytes(version), options, providers=PROVIDERS["cpu"])
        except Exception:  # ORT raises its own Fail/InvalidGraph types without a base class
            continue
        return version
    return 7


def ir_ceiling(needed: int) -> int:
    """The highest IR version worth writing for a model that needs ``needed``.

    Every ONNX Runtime graphopt supports loads IR 10, so only models above it pay for
    probing the installed one (two throw-away sessions).
    """
    return 10 if needed <= 10 else max_ir_version()


def _session_options(
    threads: int | None,
    optimization: str,
    optimized_model_path: str | os.PathLike[str] | None = None,
    spinning: bool = False,
    prepacking: bool = True,
) -> ort.SessionOptions:
    options = ort.SessionOptions()
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.graph_optimization_level = _OPT_LEVELS[optimization]
    # ORT's own error lines would print before graphopt's message about the same failure (it raises them too)
    options.log_severity_level = 4
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    return options


def check_device(device: str) -> None:
    """Fail early, with the fix, when ``device`` is unknown or its provider is missing."""
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise DeviceError(
            "device 'cuda' asked for, but this ONNX Runtime build has no CUDAExecutionProvider "
            f"(available: {', '.join(ort.get_available_providers())}). Install onnxruntime-gpu, "
            "or use --device cpu."
        )


def create_session(
    model: ModelSource,
    device: str = "cpu",
    *,
    threads: int | None = None,
    optimization: str = "all",
    optimized_model_path: str | os.PathLike[str] | None = None,
    spinning: bool = False,
    prepacking: bool = True,
) -> ort.InferenceSession:
    """Open an ONNX Runtime session on ``device``; raise if CUDA silently fell back to CPU.

    Idle intra-op threads do not spin-wait unless ``spinning``: graphopt's sessions take turns with
    each other and with numpy, whose BLAS threads spin too. Sessions timed in alternation steal
    each other's cores otherwise (with 2 threads on 2 cores, spinning moved the same ratio between
    0.47 and 0.69 from one measurement to the next), and calibration's runs took twice as long
    between the Hessians' matrix products (malviz-resnet18: 2.1 s for 32 runs, 1.3 s without).
    ``prepacking=False`` keeps ORT from pre-packing constant MatMul weights, a kernel choice that
    rounds differently.
    """
    check_device(device)
    options = _session_options(threads, optimization, optimized_model_path, spinning, prepacking)
    if isinstance(model, ir.Model):
        model = serialize.to_bytes(model, ir_version=min(model.ir_version, ir_ceiling(model.ir_version)))
    elif not isinstance(model, bytes):
        model = str(model)
    try:
        session = ort.InferenceSession(model, options, providers=PROVIDERS[device])
    except Exception as exc:  # ORT's exception types share no public base class
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(
            f"ONNX Runtime {ort.__version__} cannot load the model: {message[:400]}. graphopt checks models in "
            "ONNX Runtime; make sure it runs there (custom ops need their library registered)."
        ) from exc
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise DeviceError(
            "device 'cuda' asked for, but ONNX Runtime fell back to the CPU: the CUDA 13 or "
            "cuDNN 9 libraries could not be loaded. Install them (e.g. pip install "
            "'nvidia-cudnn-cu13' 'nvidia-cuda-runtime-cu13') or use --device cpu. "
            "No CPU timing is reported as CUDA."
        )
    return session


def optimized_graph(
    model: ModelSource, device: str = "cpu", *, threads: int | None = None, optimization: str = "all"
) -> tuple[ir.Model, ort.InferenceSession]:
    """The graph ONNX Runtime runs after its own fusions for ``device`` (saved and read back), and the session.

    Only for models ONNX Runtime can save inline (under 2 GB).
    """
    with tempfile.TemporaryDirectory(prefix="graphopt-ort-") as tmp:
        path = Path(tmp) / "optimized.onnx"
        session = create_session(model, device, threads=threads, optimization=optimization, optimized_model_path=path)
        return ir.load(path), session


def check_loads(path: Path) -> None:
    """Check that ONNX Runtime can load the model at ``path`` (CPU, no graph rewrites)."""
    try:
        ort.InferenceSession(str(path), _session_options(1, "disable"), providers=PROVIDERS["cpu"])
    except Exception as exc:  # ORT's exception types share no public base class
        raise ModelSaveError(
            f"ONNX Runtime cannot load the optimized model, so it was not written: {exc}. "
            "This is a graphopt bug; run with --check to find the pass that broke it."
        ) from exc


def run(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Run ``session`` on ``feeds`` and return the outputs by name."""
    names = list(outputs) if outputs is not None else [o.name for o in session.get_outputs()]
    with refused_feeds(session, feeds):
        values = session.run(names, dict(feeds))
    return dict(zip(names, values, strict=True))


@contextlib.contextmanager
def refused_feeds(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> Iterator[None]:
    """Turn ONNX Runtime's refusal of the inputs (a shape, a type, a missing name, an index out of
    a table) into a :class:`DataError` that sets what the model expects beside what it was given.

    Every session run on user data goes through here, so no such refusal surfaces as a traceback.
    """
    try:
        yield
    except (InvalidArgument, ValueError) as exc:
        if isinstance(exc, ValueError) and "input" not in str(exc).lower():
            raise
        expected = ", ".join(f"{i.name} {i.type} {i.shape}" for i in session.get_inputs())
        given = ", ".join(f"{k} {np.asarray(v).dtype} {list(np.shape(v))}" for k, v in feeds.items())
        reason = " ".join(str(exc).replace("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ", "").split())
        raise DataError(
            f"ONNX Runtime refuses the inputs: {reason[:300]}. The model expects {expected}; it was given {given}. "
            "Give data that fits the model's inputs (names, dtypes, shapes, index ranges)."
        ) from exc


def measure_latency(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], *, warmup: int = 5, runs: int = 50
) -> Latency:
    """Median and p90 latency of ``runs`` calls after ``warmup`` untimed ones."""
    return interleaved_latency({"model": session}, feeds, warmup=warmup, runs=runs)["model"]


def interleaved_latency(
    sessions: Mapping[str, ort.InferenceSession],
    feeds: Mapping[str, np.ndarray],
    *,
    warmup: int = 5,
    runs: int = 50,
    warmup_seconds: float = 0.2,
) -> dict[str, Latency]:
    """Time several sessions in alternation so machine noise hits them all alike.

    Warm-up lasts ``warmup`` rounds and at least ``warmup_seconds`` (at most 200 rounds): a fresh
    session's first calls of a sub-millisecond model are slower for longer than a few rounds.
    """
    feeds = dict(feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    with refused_feeds(next(iter(sessions.values())), feeds):
        start, rounds = time.perf_counter(), 0
        while rounds < warmup or (time.perf_counter() - start < warmup_seconds and rounds < 200):
            for session in sessions.values():
                session.run(None, feeds)
            rounds += 1
        for _ in range(runs):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, feeds)
                times[name].append((time.perf_counter() - start) * 1e3)
    return {name: _summarize(samples) for name, samples in times.items()}


def sized_latency(
    reference: ort.InferenceSession,
    candidate: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    *,
    min_runs: int = 20,
    seconds: float = 1.0,
) -> dict[str, Latency]:
    """``reference`` and ``candidate`` ("optimized") timed interleaved, as long as the model's speed needs.

    A fresh session runs its first calls slower (allocations, pre-packing) than a warm one, so the
    warm-up and the number of runs grow with how fast the model is: about 0.2 s of warm-up and
    ``seconds`` of timed runs, never fewer than ``min_runs``.
    """
    return sized_latency_of({"reference": reference, "optimized": candidate}, feeds, min_runs=min_runs, seconds=seconds)


def sized_latency_of(
    sessions: Mapping[str, ort.InferenceSession],
    feeds: Mapping[str, np.ndarray],
    *,
    min_runs: int = 20,
    seconds: float = 1.0,
) -> dict[str, Latency]:
    """:func:`sized_latency` of any number of sessions, timed in one interleaved series (sized as for a pair)."""
    feeds = dict(feeds)
    with refused_feeds(next(iter(sessions.values())), feeds):
        start = time.perf_counter()
        for session in sessions.values():
            session.run(None, feeds)
        once = max((time.perf_counter() - start) * 2 / len(sessions), 1e-6)  # one round of a pair
    warmup = max(3, min(50, int(0.2 / once)))
    runs = max(min_runs, min(300, int(seconds / once)))
    return interleaved_latency(sessions, feeds, warmup=warmup, runs=runs)


def _summarize(samples: list[float]) -> Latency:
    ordered = sorted(samples)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return Latency(statistics.median(ordered), p90, ordered[0], len(ordered))
