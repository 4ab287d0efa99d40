"""Where input data comes from: .npz files, folders of .npy files, Python iterables, or
random tensors generated from the model's input specs.

A source yields batches (``dict[input name, array]``) one at a time, so consumers that
reduce them to statistics never hold all samples. Arrays in files have the sample axis
first; a source cuts them into batches of ``batch_size`` samples.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import typing
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt.errors import DataError

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]


class Sample(dict[str, np.ndarray]):
    """One feed that is one sample whatever its shapes (a file of a per-sample folder): a graph of 35 nodes fed as
    ``[35, F]`` is one sample, not 35."""


def batch_samples(batch: Mapping[str, np.ndarray]) -> int:
    """How many samples ``batch`` holds: one for a :class:`Sample`, else its first input's axis 0 (1 for a scalar)."""
    if isinstance(batch, Sample):
        return 1
    first = next(iter(batch.values()), None)
    return len(first) if first is not None and np.ndim(first) else 1


# Calibration samples used when a data source is given without a count.
DEFAULT_CALIBRATION_SAMPLES = 128
# A symbolic dimension past the first with no --dim gets this size in generated inputs (with a warning).
DEFAULT_DIM = 32

# Random inputs larger than this (elements, ~1 GiB of float32) are refused, not allocated.
MAX_GENERATED_ELEMENTS = 1 << 28

# An .npz member larger than this (read whole into memory) is refused before it is allocated.
MAX_DATA_BYTES = 8 << 30


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype and shape (ints, symbolic names or None)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    index_bound: int | None = None  # exclusive upper bound when the input indexes a table
    hints: tuple[tuple[str, int], ...] = ()  # sizes of symbolic dims read off the graph, for generated inputs
    missing_ok: bool = False  # NaN means "missing" here: the input reaches an op that handles it (a tree ensemble)


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The specs of the model's graph inputs that are not initializers."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.type is None or not isinstance(value.type, ir.TensorType):
            raise DataError(f"input {value.name!r} is not a tensor; graphopt feeds only tensor inputs.")
        dims = tuple(_dim(d) for d in value.shape) if value.shape is not None else ()
        hints: tuple[tuple[str, int], ...] = ()
        head = _attention_head_size(value) if len(dims) == 4 and isinstance(dims[3], str) else None
        if head is not None:  # a KV cache's head size the export left symbolic: read it off the attention op
            hints = ((str(dims[3]), head),)
        missing = _takes_missing(value)
        specs.append(InputSpec(value.name, value.dtype.numpy(), dims, _index_bound(value), hints, missing))
    return specs


# Ops that read NaN as a missing value (tree ensembles follow their missing-value branch; Imputer replaces it;
# IsNaN tests for it), and the ops an input may pass through on its way there without losing that meaning.
MISSING_VALUE_OPS = {
    ("ai.onnx.ml", "TreeEnsembleClassifier"),
    ("ai.onnx.ml", "TreeEnsembleRegressor"),
    ("ai.onnx.ml", "TreeEnsemble"),
    ("ai.onnx.ml", "Imputer"),
    ("", "IsNaN"),
}
_PASS_THROUGH = ("Identity", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Slice")


def _takes_missing(value: ir.Value, depth: int = 0) -> bool:
    """Whether NaN in ``value`` means "missing" to the model: it reaches a :data:`MISSING_VALUE_OPS` op through data
    movement alone (LightGBM and XGBoost exports feed NaN to their trees on purpose)."""
    for node, _ in value.uses():
        domain = "" if node.domain == "ai.onnx" else node.domain
        if (domain, node.op_type) in MISSING_VALUE_OPS:
            return True
        passes_on = domain == "" and node.op_type in _PASS_THROUGH and depth < 4
        if passes_on and any(_takes_missing(out, depth + 1) for out in node.outputs):
            return True
    return False


def _attention_head_size(value: ir.Value) -> int | None:
    """The head size of a past key/value input read by ONNX Runtime's GroupQueryAttention (ORT GenAI's exports):
    the query's last dimension over the heads it packs (query, and key and value when those inputs are empty)."""
    for node, index in value.uses():
        if node.op_type != "GroupQueryAttention" or index not in (3, 4) or not node.inputs or node.inputs[0] is None:
            continue
        query = node.inputs[0].shape
        width = query[-1] if query is not None and len(query) else None
        heads = node.attributes.get_int("num_heads", 0)
        packed = len(node.inputs) < 3 or node.inputs[1] is None or node.inputs[2] is None
        if packed:
            heads += 2 * node.attributes.get_int("kv_num_heads", 0)
        if isinstance(width, int) and heads > 0 and width % heads == 0:
            return width // heads
    return None


def _dim(dim: object) -> int | str | None:
    if isinstance(dim, int):
        return dim
    return str(dim.value) if getattr(dim, "value", None) is not None else None


def _index_bound(value: ir.Value) -> int | None:
    """For an integer input used as Gather indices into a constant table, the table size."""
    for node, index in value.uses():
        if node.op_type == "Gather" and node.domain == "" and index == 1:
            table = node.inputs[0]
            if table is not None and table.const_value is not None:
                axis = node.attributes.get_int("axis", 0)
                return int(table.const_value.shape[axis])
    return None


def resolve_shape(spec: InputSpec, dims: Mapping[str, int], batch: int) -> tuple[int, ...]:
    """Concrete shape for ``spec``: symbolic dims from ``dims``, a leading unknown dim = batch."""
    shape = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim >= 0:
            shape.append(dim)
        elif isinstance(dim, str) and dim in dims:
            shape.append(int(dims[dim]))
        elif f"{spec.name}:{axis}" in dims:
            shape.append(int(dims[f"{spec.name}:{axis}"]))
        elif axis == 0:
            shape.append(batch)
        else:  # generated inputs only: real data brings its own sizes
            name = dim or f"{spec.name}:{axis}"
            _warn_once(
                ("dim", name),  # said once per dimension, however many inputs have it
                f"dimension {name!r} (input {spec.name!r}, axis {axis}) has no value; generated inputs use "
                f"{DEFAULT_DIM}. Give the size you deploy with: --dim {name}=N (recipe: verify.dims), or real data.",
            )
            shape.append(DEFAULT_DIM)
    if int(np.prod(shape, dtype=np.float64)) > MAX_GENERATED_ELEMENTS:
        raise DataError(
            f"input {spec.name!r} has shape {tuple(shape)}, too large to generate random data for. "
            "Give real inputs (--verify-data / --calib) or smaller --dim values."
        )
    return tuple(shape)


def random_batch(specs: list[InputSpec], rng: np.random.Generator, dims: Mapping[str, int], batch: int) -> Batch:
    """One batch of random inputs that fit the specs (indices stay inside their tables)."""
    feeds = {}
    for spec in specs:
        shape = resolve_shape(spec, dims, batch)
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        elif "mask" in spec.name.lower():
            feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
        else:
            high = spec.index_bound if spec.index_bound is not None else 2
            feeds[spec.name] = rng.integers(0, high, shape).astype(spec.dtype)
    return feeds


PAST_PREFIX = "past_key_values"  # KV-cache inputs of ORT GenAI and Hugging Face decoder exports


def cache_dims(specs: list[InputSpec], dims: Mapping[str, int]) -> dict[str, int]:
    """``dims`` completed for a decoder with a KV cache: an empty past (length 0) and an attention mask as long
    as past plus new tokens, unless given. Independent sizes do not add up (ONNX Runtime's attention kernels
    refuse a mask of 32 over 32 new tokens after 32 cached ones)."""
    out = dict(dims)
    for spec in specs:
        for name, size in spec.hints:
            out.setdefault(name, size)
    past = [s for s in specs if s.name.startswith(PAST_PREFIX) and len(s.shape) == 4]
    if not past:
        return out
    past_dim = past[0].shape[2]
    if isinstance(past_dim, str) and past_dim not in out:
        out[past_dim] = 0
    tokens = next((s for s in specs if s.name in ("input_ids", "inputs_embeds") and len(s.shape) >= 2), None)
    mask = next((s for s in specs if s.name == "attention_mask" and len(s.shape) == 2), None)
    if tokens is not None and mask is not None:
        new, total = tokens.shape[1], mask.shape[1]
        if isinstance(total, str) and total != new and total not in out:
            new_len = out.get(new, DEFAULT_DIM) if isinstance(new, str) else new
            past_len = out.get(past_dim, 0) if isinstance(past_dim, str) else past_dim
            if isinstance(new_len, int) and isinstance(past_len, int):
                out[total] = new_len + past_len
    return out


def iter_random(
    specs: list[InputSpec], *, seed: int, samples: int, dims: Mapping[str, int], batch_size: int = 1
) -> Iterator[Batch]:
    """``samples`` random samples in batches, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    dims = cache_dims(specs, dims)
    for start in range(0, samples, batch_size):
        yield random_batch(specs, rng, dims, min(batch_size, samples - start))


def load_arrays(path: str | os.PathLike[str], samples: int | None = None) -> dict[str, np.ndarray]:
    """Arrays keyed by input name from an .npz file, a folder of ``<input>.npy`` files or one .npy file.

    Headers are checked before anything is allocated: a declared size past the end of the file is
    a truncated file. .npy files are memory-mapped and .npz members decompressed as a stream only
    up to the first ``samples`` rows, so a run reads the samples it uses, not the file; an .npz
    member read whole (Fortran order, or every sample asked for) must fit :data:`MAX_DATA_BYTES`.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder. Give an .npz file or a folder of .npy files.")
    try:
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise DataError(
                    f"{path}: the folder has no .npy files (one <input name>.npy per input) and no .npz files "
                    "(one per sample)."
                )
            return {f.stem: _load_npy(_regular_file(f)) for f in files}
        if path.suffix == ".npy":
            return {path.stem: _load_npy(_regular_file(path))}
        return _load_npz(_regular_file(path), samples)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: cannot read it as .npz/.npy data ({exc}). Write it again with numpy.") from exc


def _regular_file(path: Path) -> Path:
    """``path``, if it is a regular file (through symlinks): reading a FIFO or a device would wait forever."""
    if not path.is_file():
        raise DataError(f"{path}: not a regular file (a pipe, device, socket or folder). Give .npz or .npy files.")
    return path


def _load_npy(path: Path) -> np.ndarray:
    with path.open("rb") as handle:
        shape, dtype = _read_header(handle, path.name)
        _check_size(path.stem, shape, dtype, available=path.stat().st_size - handle.tell(), where=path)
    return np.load(path, mmap_mode="r" if shape else None, allow_pickle=False)


def _load_npz(path: Path, samples: int | None = None) -> dict[str, np.ndarray]:
    arrays = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.infolist():
            with archive.open(member) as handle:
                name = member.filename.removesuffix(".npy")
                shape, fortran, dtype = _read_header(handle, name, with_order=True)
                available = member.file_size - handle.tell()
                rows = None if not shape else shape[0] if samples is None else min(samples, shape[0])
                kept = (rows, *shape[1:]) if shape else shape
                _check_size(name, shape, dtype, available=available, where=path)  # the whole member is there
                _check_size(name, kept, dtype, available=available, where=path, limit=True)  # what is read fits
                if fortran:  # rows are not contiguous: read whole (within the limit), then cut
                    _check_size(name, shape, dtype, available=available, where=path, limit=True)
                    read = shape
                else:
                    read = kept
                count = int(np.prod(read, dtype=np.int64))
                array = _read_into(handle, np.empty(count, dtype=dtype))  # decompresses only these bytes
                array = array.reshape(read, order="F" if fortran else "C")
                arrays[name] = array[:rows] if shape else array
    return arrays


def _read_into(handle: typing.BinaryIO, array: np.ndarray, chunk: int = 64 * 2**20) -> np.ndarray:
    """Fill ``array`` from ``handle`` in chunks: the peak is the array, not the array and a bytes copy of it."""
    view = memoryview(array).cast("B")
    done = 0
    while done < len(view):
        data = handle.read(min(chunk, len(view) - done))
        if not data:
            raise ValueError(f"the member ends after {done} of {len(view)} bytes")
        view[done : done + len(data)] = data
        done += len(data)
    return array


def _read_header(handle: typing.BinaryIO, name: str, *, with_order: bool = False) -> typing.Any:
    """(shape, dtype), or (shape, fortran order, dtype) with ``with_order``; refuses object arrays (pickles)."""
    version = np.lib.format.read_magic(handle)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(handle)
    if dtype.kind not in "biufSU":
        raise DataError(
            f"array {name!r} holds {dtype} values, which numpy stores as a pickle; graphopt reads numbers (bool, "
            "int, float) and fixed-width strings only. Save numbers, or strings as np.array(words, dtype=str)."
        )
    return (shape, fortran, dtype) if with_order else (shape, dtype)


def _check_size(
    name: str, shape: tuple[int, ...], dtype: np.dtype, *, available: int, where: Path, limit: bool = False
) -> None:
    size = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    if limit and size > MAX_DATA_BYTES:
        raise DataError(
            f"{where}: array {name!r} declares shape {shape} of {dtype} ({size / 2**30:.1f} GiB), over graphopt's "
            f"{MAX_DATA_BYTES >> 30} GiB limit per array. Give fewer samples, or a folder of .npy files."
        )
    if size > available:
        raise DataError(
            f"{where}: array {name!r} declares shape {shape} of {dtype} ({size} bytes) but holds {available}: "
            "the file is truncated. Write it again with numpy."
        )


def iter_arrays(arrays: Mapping[str, np.ndarray], specs: list[InputSpec], batch_size: int) -> Iterator[Batch]:
    """Cut arrays (sample axis first) into batches holding just the model's inputs.

    A 0-d array feeds a rank-0 input the same value in every batch. Each batch is checked
    (:func:`check_batch`) before it reaches ONNX Runtime.
    """
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise DataError(
            f"the data has no array for input(s) {missing}; it has {sorted(arrays)}. "
            "Name each array after a model input."
        )
    for spec in specs:
        _check_array(arrays[spec.name], spec)
    counts = {len(arrays[s.name]) for s in specs if s.shape}
    if len(counts) > 1:
        sizes = {s.name: len(arrays[s.name]) for s in specs if s.shape}
        raise DataError(f"the arrays have different sample counts {sizes}; give every input the same number.")
    count = counts.pop() if counts else 1
    for start in range(0, count, batch_size):
        batch = {s.name: _cut(arrays[s.name], s, start, batch_size) for s in specs}
        check_batch(batch, specs, first_sample=start)
        yield batch


_WARNED: set[tuple[str, str]] = set()  # (input or dimension, what) warned about once per process


def _warn_once(key: tuple[str, str], message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        logger.warning(message)


def _check_array(array: np.ndarray, spec: InputSpec) -> None:
    if array.dtype == np.float64 and np.dtype(spec.dtype) == np.float32:
        _warn_once(
            (spec.name, "float64"),
            f"the data for input {spec.name!r} is float64 and the model takes float32: it is rounded to float32 "
            "(save it as float32 to feed exactly what the model will see).",
        )
    if array.dtype.kind in "biu" and np.dtype(spec.dtype).kind == "f":
        _warn_once(
            (spec.name, "integer"),
            f"the data for input {spec.name!r} is {array.dtype} and the model takes {np.dtype(spec.dtype)}: whole "
            "numbers are fed as they are. If the values had fractions (features, logits, audio), they were cut off "
            "before they were saved; save them as floating point.",
        )
    if np.dtype(spec.dtype).kind in "OSU":  # a string input (phonemes, words): str or bytes arrays, fed as objects
        if array.dtype.kind not in "OSU":
            raise DataError(
                f"array {spec.name!r} holds {array.dtype} values; input {spec.name!r} takes strings. "
                "Give an array of str (numpy dtype <U or object)."
            )
    elif array.dtype.kind not in "biuf":
        raise DataError(
            f"array {spec.name!r} holds {array.dtype} values; input {spec.name!r} takes {spec.dtype}. "
            "Convert the data to numbers of that type."
        )
    if array.ndim != len(spec.shape) or (array.ndim == 0) != (not spec.shape):
        raise DataError(
            f"array {spec.name!r} has shape {array.shape}, rank {array.ndim}; the input expects rank "
            f"{len(spec.shape)} (shape {_shape_text(spec.shape)}); the sample axis must be the input's first axis."
        )
    for axis, (given, wanted) in enumerate(zip(array.shape[1:], spec.shape[1:], strict=True), 1):
        if isinstance(wanted, int) and wanted >= 0 and given != wanted:
            raise DataError(
                f"array {spec.name!r} has shape {array.shape}; input {spec.name!r} expects {_shape_text(spec.shape)}: "
                f"axis {axis} must be {wanted}, not {given}. Give data of the model's input shape."
            )


def _shape_text(shape: tuple[int | str | None, ...]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _cut(array: np.ndarray, spec: InputSpec, start: int, size: int) -> np.ndarray:
    part = array if array.ndim == 0 else array[start : start + size]
    integer_input = np.issubdtype(spec.dtype, np.integer)
    if integer_input and np.issubdtype(part.dtype, np.floating) and not np.array_equal(part, np.round(part)):
        raise DataError(
            f"array {spec.name!r} holds fractional values but input {spec.name!r} takes {spec.dtype}; "
            "give whole numbers (e.g. token ids as integers)."
        )
    return as_input(part, spec)


def as_input(array: np.ndarray, spec: InputSpec) -> np.ndarray:
    """``array`` in the input's dtype. Strings go to ONNX Runtime as str objects: it would read a ``bytes`` object
    as its repr (``b"a"`` as ``"b'a'"``), so byte strings are decoded as UTF-8 first."""
    array = np.asarray(array)
    if np.dtype(spec.dtype).kind == "O":
        if array.dtype.kind == "S":
            array = np.char.decode(array, "utf-8")
        elif array.dtype.kind == "O" and any(isinstance(x, bytes) for x in array.flat):
            array = np.vectorize(lambda x: x.decode("utf-8") if isinstance(x, bytes) else x, otypes=[object])(array)
    return np.ascontiguousarray(array, dtype=spec.dtype)


def check_batch(batch: Batch, specs: list[InputSpec], *, first_sample: int = 0) -> None:
    """Refuse values no model should get: NaN or Inf, and indices outside the table they index. NaN is let through
    where the model reads it as a missing value (:attr:`InputSpec.missing_ok`).

    Caught here, they are named by input and sample; in ONNX Runtime they would surface as an
    accuracy failure (NaN compares as an infinite error) or an error inside a Gather node.
    """
    for spec in specs:
        array = batch[spec.name]
        rows = array.reshape(array.shape[0], int(np.prod(array.shape[1:]))) if array.ndim else array.reshape(1, 1)
        if np.issubdtype(array.dtype, np.floating) and spec.missing_ok:  # NaN is "missing" there; Inf is not
            bad = np.isinf(rows).any(axis=1)
            what = "Inf values"
        elif np.issubdtype(array.dtype, np.floating):
            bad = ~np.isfinite(rows).all(axis=1)
            what = "NaN or Inf values"
        elif spec.index_bound is not None and np.issubdtype(array.dtype, np.integer):
            bad = ((rows < -spec.index_bound) | (rows >= spec.index_bound)).any(axis=1)
            what = f"indices outside [0, {spec.index_bound}), the size of the table it indexes"
        else:
            continue
        if bad.any():
            sample = first_sample + int(np.argmax(bad))
            raise DataError(f"input {spec.name!r}, sample {sample}: the data holds {what}. Fix or drop that sample.")


@dataclass(frozen=True)
class DataSpec:
    """How to obtain input batches: a path, arrays by input name, an iterable of feeds, or random tensors."""

    source: str | os.PathLike[str] | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]] | None = None
    samples: int = 8
    batch_size: int = 1
    seed: int = 0
    dims: Mapping[str, int] | None = None
    skip: int = 0  # samples of ``source`` passed over first (verification held out from calibration)

    def __post_init__(self) -> None:
        # A count of 0 would verify or calibrate on nothing and still report success.
        for name, value in (("samples", self.samples), ("batch_size", self.batch_size), *(self.dims or {}).items()):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"{name} must be a whole number of at least 1; got {value!r}.")
        if isinstance(self.skip, bool) or not isinstance(self.skip, int) or self.skip < 0:
            raise DataError(f"skip must be a whole number of at least 0; got {self.skip!r}.")
        if self.source is not None and not isinstance(self.source, (str, os.PathLike, Mapping, Replayable)):
            # A generator or an ORT CalibrationDataReader is read once: keep what it gives for the next reader.
            object.__setattr__(self, "source", as_source(self.source))

    def describe(self) -> str:
        """Which inputs these are, for a report: the source and the samples used."""
        if self.source is None:
            return f"seeded random inputs from the input specs (seed {self.seed}, {self.samples} samples)"
        if isinstance(self.source, (str, os.PathLike)):
            where = str(self.source) + (" (one .npz per sample)" if is_sample_folder(self.source) else "")
        else:
            where = "arrays given from Python" if isinstance(self.source, Mapping) else "feeds given from Python"
        return f"{where}, samples {self.skip} to {self.skip + self.samples - 1} at most"


def require_data(data: DataSpec | None, pass_name: str) -> DataSpec:
    """``data``, or the error that tells the user how to give a pass its calibration data."""
    if data is None:
        raise DataError(
            f"pass {pass_name!r} needs calibration data; give --calib DATA.npz "
            "(or a recipe `calibration: {data: ...}`)."
        )
    return data


def batch_size_for(specs: list[InputSpec], wanted: int) -> int:
    """The batch size the model accepts: ``wanted`` along a symbolic leading dim, else the fixed one.

    Exporters often fix the batch dim (``[1, 3, 800, 608]``): such a model takes exactly that
    many samples per run, whatever the recipe's batch size.
    """
    fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    symbolic = any(s.shape and not isinstance(s.shape[0], int) for s in specs)
    if len(fixed) == 1 and not symbolic:
        return fixed.pop()
    return wanted


class SampleFolder:
    """A folder of per-sample ``.npz`` files, each one feed (input name -> array, any shapes), read one at a time.

    Iterating again reads the files again: nothing is held beyond the feed in use.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.files = sorted(self.path.glob("*.npz"))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for file in self.files:
            try:
                yield _load_npz(_regular_file(file))
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise DataError(f"{file}: cannot read it as .npz data ({exc}). Write it again with numpy.") from exc


def is_sample_folder(path: str | os.PathLike[str]) -> bool:
    """A folder of per-sample .npz files (a folder of <input>.npy arrays is the other kind)."""
    path = Path(path)
    return path.is_dir() and any(path.glob("*.npz")) and not any(path.glob("*.npy"))


class Replayable:
    """Feeds from a one-shot source (a generator, ONNX Runtime's ``CalibrationDataReader``), iterable again.

    Calibration and verification read their data more than once (a pass's statistics, the
    accuracy fallback's re-calibration): feeds taken from the source are kept, so the next
    pass replays them and then goes on reading the source. Only the feeds used are held.
    A reader is read through ``get_next()`` until it returns None, as ORT's quantizer does.
    """

    def __init__(self, source: object) -> None:
        self._next = getattr(source, "get_next", None) or iter(source).__next__  # type: ignore[call-overload]
        self._seen: list[Mapping[str, np.ndarray]] = []
        self._done = False

    def __iter__(self) -> Iterator[Mapping[str, np.ndarray]]:
        yield from list(self._seen)
        while not self._done:
            try:
                feed = self._next()
            except StopIteration:
                feed = None
            except Exception as exc:  # the user's code failed partway: their error, said in one line
                raise DataError(
                    f"the data source failed at feed {len(self._seen)}: {type(exc).__name__}: {exc}"
                ) from exc
            if feed is None:
                self._done = True
                return
            if not isinstance(feed, Mapping):
                raise DataError(f"the data source gave a {type(feed).__name__}, not a dict of input name -> array.")
            self._seen.append(feed)
            yield feed


def load_script(spec: str) -> object:
    """``FILE.py:FUNCTION`` imported and called: its feeds (an iterable of dicts, or a CalibrationDataReader).

    What Polygraphy's data-loader scripts and Olive's user scripts are: the user's own code makes
    the inputs, in the forms they already have.
    """
    file, sep, function = spec.rpartition(":")
    if not sep or not file.endswith(".py") or not function.isidentifier():
        raise DataError(f"--calib-script {spec!r}: expected FILE.py:FUNCTION, e.g. data.py:calibration_feeds.")
    path = Path(file)
    if not path.is_file():
        raise DataError(f"--calib-script: {path}: no such file.")
    module_spec = importlib.util.spec_from_file_location(f"graphopt_user_data_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise DataError(f"--calib-script: {path} cannot be imported as a Python module.")
    module = importlib.util.module_from_spec(module_spec)
    # As `python data.py` would: the module is registered (dataclasses look it up) and its folder is importable.
    sys.modules[module_spec.name] = module
    if str(path.parent.resolve()) not in sys.path:
        sys.path.insert(0, str(path.parent.resolve()))
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: any error is theirs to fix, named with its line
        raise DataError(f"--calib-script: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    made = getattr(module, function, None)
    if not callable(made):
        raise DataError(f"--calib-script: {path} has no function {function!r}.")
    try:
        feeds = made()
    except Exception as exc:
        raise DataError(f"--calib-script: {function}() failed: {type(exc).__name__}: {exc}") from exc
    if not (hasattr(feeds, "get_next") or isinstance(feeds, Iterable)) or isinstance(feeds, (str, bytes, Mapping)):
        raise DataError(
            f"--calib-script: {function}() returned a {type(feeds).__name__}; return an iterable of feed dicts "
            "(input name -> array), e.g. a generator, or an ONNX Runtime CalibrationDataReader."
        )
    return as_source(feeds)


def as_source(source: object) -> object:
    """A DataSpec source as iter_batches reads it: one-shot iterators and readers become :class:`Replayable`."""
    if hasattr(source, "get_next") or isinstance(source, Iterator):
        return Replayable(source)
    return source


def iter_batches(data: DataSpec, specs: list[InputSpec]) -> Iterator[Batch]:
    """Batches for ``data``, at most ``data.samples`` samples in all, in batches the model accepts."""
    dims = dict(data.dims or {})
    named = sorted({dim for spec in specs for dim in spec.shape if isinstance(dim, str) and dim})
    by_axis = {f"{s.name}:{axis}" for s in specs for axis, dim in enumerate(s.shape) if not isinstance(dim, int)}
    unknown = sorted(set(dims) - set(named) - by_axis)
    if unknown:  # a typo would silently leave the dim at its default
        raise DataError(
            f"--dim {', '.join(unknown)}: the model has no such symbolic dimension; "
            + (f"its inputs have {', '.join(named)}." if named else "its inputs have none (every dimension is fixed).")
        )
    batch_size = batch_size_for(specs, data.batch_size)
    if data.source is None:
        return iter_random(specs, seed=data.seed, samples=data.samples, dims=dims, batch_size=batch_size)
    if isinstance(data.source, (str, os.PathLike)) and is_sample_folder(data.source):
        return _iter_given(SampleFolder(data.source), specs, data.samples, data.skip, per_feed=True)
    if isinstance(data.source, (str, os.PathLike, Mapping)):
        # A mapping holds what an .npz does: one array per input, samples along axis 0.
        if isinstance(data.source, Mapping):
            arrays = {name: np.asarray(array) for name, array in data.source.items()}
        else:
            arrays = _lone_array(load_arrays(data.source, data.skip + data.samples), Path(data.source), specs)
        end = data.skip + data.samples
        arrays = {name: array if array.ndim == 0 else array[data.skip : end] for name, array in arrays.items()}
        return iter_arrays(arrays, specs, batch_size)
    return _iter_given(data.source, specs, data.samples, data.skip)


def _lone_array(arrays: dict[str, np.ndarray], path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """One .npy file feeds a single-input model whatever the file is called."""
    if path.suffix != ".npy" or path.is_dir():
        return arrays
    if len(specs) != 1:
        raise DataError(
            f"{path}: one .npy file holds one array, but the model has inputs {[s.name for s in specs]}. "
            "Give an .npz with one array per input, or a folder of <input name>.npy files."
        )
    return {specs[0].name: next(iter(arrays.values()))}


def _iter_given(
    source: Iterable[Mapping[str, np.ndarray]],
    specs: list[InputSpec],
    samples: int,
    skip: int = 0,
    *,
    per_feed: bool = False,
) -> Iterator[Batch]:
    """Feeds of ``source``, checked and cast, up to ``samples`` samples after ``skip``: a feed holds its first input's
    axis 0 of them, or one with ``per_feed`` (a folder of per-sample files)."""
    seen, passed = 0, 0
    for batch in source:
        if passed < skip:  # whole feeds are passed over until ``skip`` samples have gone by
            passed += 1 if per_feed else batch_samples(batch)
            continue
        if seen >= samples:
            return
        missing = [s.name for s in specs if s.name not in batch]
        if missing:
            where = f"a file of {source.path}" if isinstance(source, SampleFolder) else "a feed of the data given"
            raise DataError(
                f"{where} lacks the model's input(s) {missing}; it has {sorted(batch)}. "
                "Give data for this model's inputs (named as the model names them)."
            )
        for spec in specs:
            _check_array(np.asarray(batch[spec.name]), spec)
        feeds = {s.name: as_input(batch[s.name], s) for s in specs}
        if per_feed:
            feeds = Sample(feeds)
        check_batch(feeds, specs, first_sample=seen)
        seen += batch_samples(feeds)
        yield feeds
