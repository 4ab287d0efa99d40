"""Where input data comes from: .npz files, folders of .npy files, Python iterables, or
random tensors generated from the model's input specs.

A source yields batches (``dict[input name, array]``) one at a time, so consumers that
reduce them to statistics never hold all samples. Arrays in files have the sample axis
first; a source cuts them into batches of ``batch_size`` samples.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphopt.errors import DataError

Batch = dict[str, np.ndarray]

# Calibration samples used when a data source is given without a count.
DEFAULT_CALIBRATION_SAMPLES = 128

# Random inputs larger than this (elements, ~1 GiB of float32) are refused, not allocated.
MAX_GENERATED_ELEMENTS = 1 << 28


@dataclass(frozen=True)
class InputSpec:
    """A graph input: name, numpy dtype and shape (ints, symbolic names or None)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]
    index_bound: int | None = None  # exclusive upper bound when the input indexes a table


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The specs of the model's graph inputs that are not initializers."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.type is None or not isinstance(value.type, ir.TensorType):
            raise DataError(f"input {value.name!r} is not a tensor; graphopt feeds only tensor inputs.")
        dims = tuple(_dim(d) for d in value.shape) if value.shape is not None else ()
        specs.append(InputSpec(value.name, value.dtype.numpy(), dims, _index_bound(value)))
    return specs


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
        elif axis == 0:
            shape.append(batch)
        else:
            raise DataError(
                f"input {spec.name!r} has dimension {axis} = {dim!r} with no value. Give it one: "
                f"--dim {dim or f'{spec.name}:{axis}'}=N (recipe: verify.dims)."
            )
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


def iter_random(
    specs: list[InputSpec], *, seed: int, samples: int, dims: Mapping[str, int], batch_size: int = 1
) -> Iterator[Batch]:
    """``samples`` random samples in batches, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    for start in range(0, samples, batch_size):
        yield random_batch(specs, rng, dims, min(batch_size, samples - start))


def load_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Arrays keyed by input name from an .npz file or a folder of ``<input>.npy`` files."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder. Give an .npz file or a folder of .npy files.")
    try:
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise DataError(f"{path}: the folder has no .npy files (one <input name>.npy per input).")
            return {f.stem: np.load(f, allow_pickle=False) for f in files}
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read it as .npz/.npy data ({exc}).") from exc


def iter_arrays(arrays: Mapping[str, np.ndarray], specs: list[InputSpec], batch_size: int) -> Iterator[Batch]:
    """Cut arrays (sample axis first) into batches holding just the model's inputs."""
    missing = [s.name for s in specs if s.name not in arrays]
    if missing:
        raise DataError(
            f"the data has no array for input(s) {missing}; it has {sorted(arrays)}. "
            "Name each array after a model input."
        )
    count = len(arrays[specs[0].name]) if specs else 0
    for spec in specs:
        array = arrays[spec.name]
        if len(array) != count:
            raise DataError(f"array {spec.name!r} has {len(array)} samples, expected {count} like the others.")
        if array.ndim != len(spec.shape):
            raise DataError(
                f"array {spec.name!r} has rank {array.ndim}, the input expects rank {len(spec.shape)} "
                f"(shape {spec.shape}); the sample axis must be the input's first axis."
            )
    for start in range(0, count, batch_size):
        yield {s.name: np.ascontiguousarray(arrays[s.name][start : start + batch_size], dtype=s.dtype) for s in specs}


@dataclass(frozen=True)
class DataSpec:
    """How to obtain input batches: a path, an iterable, or random tensors."""

    source: str | os.PathLike[str] | Iterable[Mapping[str, np.ndarray]] | None = None
    samples: int = 8
    batch_size: int = 1
    seed: int = 0
    dims: Mapping[str, int] | None = None


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


def iter_batches(data: DataSpec, specs: list[InputSpec]) -> Iterator[Batch]:
    """Batches for ``data``, at most ``data.samples`` samples in all, in batches the model accepts."""
    dims = dict(data.dims or {})
    batch_size = batch_size_for(specs, data.batch_size)
    if data.source is None:
        return iter_random(specs, seed=data.seed, samples=data.samples, dims=dims, batch_size=batch_size)
    if isinstance(data.source, (str, os.PathLike)):
        arrays = load_arrays(data.source)
        arrays = {name: array[: data.samples] for name, array in arrays.items()}
        return iter_arrays(arrays, specs, batch_size)
    return _iter_given(data.source, specs, data.samples)


def _iter_given(source: Iterable[Mapping[str, np.ndarray]], specs: list[InputSpec], samples: int) -> Iterator[Batch]:
    seen = 0
    for batch in source:
        if seen >= samples:
            return
        missing = [s.name for s in specs if s.name not in batch]
        if missing:
            raise DataError(f"a batch from the iterable lacks input(s) {missing}; it has {sorted(batch)}.")
        feeds = {s.name: np.asarray(batch[s.name], dtype=s.dtype) for s in specs}
        seen += len(next(iter(feeds.values()))) if feeds and next(iter(feeds.values())).ndim else 1
        yield feeds
