"""Load models with ONNX Runtime's default optimizations in a child process, so an ORT crash is an error.

ORT can crash (a segmentation fault, not an exception) while optimizing some graphs, e.g.
ORT 1.31 on a float16 Transpose between Casts around a float32 GRU. Loading such a model in
graphopt's own process would kill it; the child's death becomes a clear error instead.

The child is started ahead of need (:func:`warm`, when a pipeline starts) and kept for the
next probe: starting Python and importing ONNX Runtime costs about 0.3 s, as much as folding a
small model, and it now overlaps the passes. A child that crashed is replaced at the next probe.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import onnx_ir as ir
import onnxruntime as ort

from graphopt import serialize
from graphopt.errors import ModelLoadError
from graphopt.runtime import PROVIDERS, ModelSource, ir_ceiling

# One JSON line in ([path, providers]), one line out per model; an ORT exception is answered,
# not raised: the in-process load that follows reports it with its context.
_WORKER = """
import json, sys
import onnxruntime as ort
for line in sys.stdin:
    path, providers = json.loads(line)
    try:
        ort.InferenceSession(path, providers=providers)
    except Exception:
        print("error", flush=True)
    else:
        print("ok", flush=True)
"""


class _Worker:
    """The child process and the lock that keeps one probe at a time on it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> subprocess.Popen[str]:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _WORKER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
        return self.process

    def send(self, path: Path, providers: list[str]) -> subprocess.Popen[str] | int:
        """Ask the child to load ``path``: the child, whose answer :meth:`receive` reads, or its exit code
        when it died before reading the request."""
        process = self.start()
        assert process.stdin is not None
        try:
            process.stdin.write(json.dumps([str(path), providers]) + "\n")
            process.stdin.flush()
        except BrokenPipeError:
            code = process.wait()
            self.process = None
            return code
        return process

    def receive(self, process: subprocess.Popen[str]) -> int | None:
        """None when the child answered; its exit code when it died loading the model."""
        assert process.stdout is not None
        if process.stdout.readline():
            return None
        code = process.wait()
        self.process = None
        return code

    def close(self) -> None:
        with self.lock:
            if self.process is not None and self.process.poll() is None:
                assert self.process.stdin is not None
                self.process.stdin.close()
                try:
                    self.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None


_worker = _Worker()
atexit.register(_worker.close)


def warm() -> None:
    """Start the child now, so that it has imported ONNX Runtime by the time a probe needs it."""
    with _worker.lock:
        _worker.start()


def close() -> None:
    """Stop the child (it is started again by the next probe)."""
    _worker.close()


def probe_load(model: ModelSource, device: str = "cpu") -> None:
    """Load ``model`` with ONNX Runtime's default optimizations in the child; raise if ORT crashes."""
    with probing(model, device):
        pass


@contextlib.contextmanager
def probing(model: ModelSource, device: str = "cpu") -> Iterator[None]:
    """Probe ``model`` in the child while the block runs (the block's own checks overlap the load).

    Raises:
        ModelLoadError: at the end of the block, when ONNX Runtime crashed loading the model.
    """
    with tempfile.TemporaryDirectory(prefix="graphopt-probe-") as tmp:
        path = _as_path(model, Path(tmp))
        if path is None:  # too large to write inline just for a probe; the in-process load still runs
            yield
            return
        with _worker.lock:
            sent = _worker.send(path, PROVIDERS[device])
            try:
                yield
            finally:  # also after an error in the block: the answer is read
                code = sent if isinstance(sent, int) else _worker.receive(sent)
    if code is not None and code < 0:
        raise ModelLoadError(
            f"ONNX Runtime {ort.__version__} crashes (signal {-code}) while it optimizes this model for "
            f"{device}; graphopt does not open it in its own process."
        )


def _as_path(model: ModelSource, folder: Path) -> Path | None:
    """The model as a file: its own, or written into ``folder``; None when too large to write inline."""
    if isinstance(model, ir.Model):
        if serialize.model_bytes(model) > serialize.EXTERNAL_DATA_THRESHOLD:
            return None
        model = serialize.to_bytes(model, ir_version=min(model.ir_version, ir_ceiling(model.ir_version)))
    if isinstance(model, bytes):
        path = folder / "probe.onnx"
        path.write_bytes(model)
        return path
    return Path(model)
