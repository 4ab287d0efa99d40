"""Load and save models: the only module of graphopt that touches protobufs.

Loading checks the file before anything else reads it: it must exist, parse as an ONNX
model, pass ``onnx.checker`` and keep all its external data inside the model's folder: every
external reference (dense or sparse, in the graph, its subgraphs or its functions) goes through
one resolver that checks it. External data stays memory-mapped by onnx_ir; sparse initializers
(which onnx_ir would drop) are densified into ordinary initializers so nothing is lost.

Saving never writes over the input (see :mod:`graphopt.destinations`): it writes into a
marked temporary folder beside the destination, checks the result with ``onnx.checker`` and
an ONNX Runtime load, and only then renames the files into place. Pruned weights can be stored as sparse initializers
(COO): onnx_ir 1.1 can neither read nor write them, so the conversion is the very last
step, on the protobuf about to be written. onnx.checker accepts only int64 indices, which
makes a 50%-dense float32 weight 1.5x its dense size, and ONNX Runtime densifies sparse
initializers when it loads them: they save disk, not memory or time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
from google.protobuf.message import DecodeError

from graphopt import destinations, model_check, prober, runtime
from graphopt.errors import ModelLoadError, ModelSaveError, PassError
from graphopt.serialize import (  # re-exported: io is where users look for them
    EXTERNAL_DATA_THRESHOLD,
    SPARSE_INDEX_BYTES,
    iter_model_tensors,
    min_ir_version,
    model_bytes,
)

logger = logging.getLogger(__name__)

# model.meta key: what onnx.checker said about an input that only ONNX Runtime accepts
CHECKER_FAILURE = "graphopt.checker_failure"
# model.meta key: the files a loaded model was read from (the .onnx file and its external data)
SOURCE_FILES = "graphopt.source_files"
STALE_TEMP_SECONDS = destinations.STALE_TEMP_SECONDS
# An external data location longer than this is no file name an exporter writes.
MAX_LOCATION_CHARS = 1024

# Sparse initializers exist from IR version 6 on.
SPARSE_MIN_IR_VERSION = 6
# sparse="always" stores weights at least this sparse: pruned ones, not a dense table that
# happens to hold a zero row (an embedding's padding token), which COO would triple.
SPARSE_MIN_ZEROS = 0.1

SparseMode = Literal["never", "auto", "always"]
_SPARSE_DTYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})


@dataclass(frozen=True)
class SavedModel:
    """Where a model was written and how large it is on disk."""

    path: Path
    data_path: Path | None
    bytes_on_disk: int
    ir_version: int
    sparse_initializers: int = 0


def load_model(path: str | os.PathLike[str]) -> ir.Model:
    """Load ``path`` into onnx_ir after checking that it is a safe, valid ONNX model."""
    path = Path(path)
    proto = _read_proto(path)
    data_files = _check_external_data(proto, path)
    checker_failure = _run_checker(path)
    densified = _densify_sparse_initializers(proto.graph, path)
    if densified:
        logger.info("densified %d sparse initializer(s) of %s", densified, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises several types on malformed graphs
        raise ModelLoadError(
            f"{path}: the graph cannot be read ({type(exc).__name__}: {exc}). "
            "Re-export the model; `python -m onnx.checker` shows the first structural problem."
        ) from exc
    _set_base_dir(model, path.parent.resolve())
    model.meta[SOURCE_FILES] = (path.resolve(), *sorted(data_files))
    if checker_failure:
        model.meta[CHECKER_FAILURE] = checker_failure
    names = [n.name for n in model.graph if n.name]
    if len(names) != len(set(names)):
        # ONNX allows duplicate node names but ONNX Runtime refuses them; values keep their names.
        ir.passes.common.NameFixPass()(model)
        logger.info("%s: renamed duplicate node names so ONNX Runtime accepts the model", path)
    model_check.check_model(model, path)
    return model


def _read_proto(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file. Check the path to the .onnx model.")
    if not path.is_file():
        raise ModelLoadError(f"{path}: is not a file. Give the path to an .onnx model file.")
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path}: the file is empty. Re-export or copy the model again.")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{path}: not an ONNX model or the file is truncated ({exc.__class__.__name__}). "
            "Re-export the model or copy it again."
        ) from exc
    if not proto.HasField("graph") or proto.ir_version <= 0 or not proto.opset_import:
        raise ModelLoadError(
            f"{path}: parses as protobuf but is not an ONNX model (no graph, IR version or "
            "opset). Give the path to an .onnx file exported by a framework."
        )
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise ModelLoadError(
                f"{path}: uses ONNX opset {opset.version}, newer than this onnx {onnx.__version__} knows "
                f"(up to {newest}). Re-export with an older opset or upgrade onnx and onnxruntime."
            )
    return proto


def _run_checker(path: Path) -> str | None:
    """None when onnx.checker accepts the model; its complaint when only ONNX Runtime does.

    ONNX Runtime registers ops of its own in the default domain (SimplifiedLayerNormalization in
    ORT GenAI's exports): a model ORT loads is a valid input, whatever the checker says.
    """
    # Checked by path so the checker resolves external data against the model's folder.
    try:
        onnx.checker.check_model(str(path))
        return None
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        try:
            runtime.check_loads(path)
        except ModelSaveError:
            raise ModelLoadError(
                f"{path}: the model is invalid ({first_line}) and ONNX Runtime cannot load it either. Re-export it; "
                "`python -m onnx.checker MODEL` prints the full check."
            ) from exc
        logger.warning("%s: onnx.checker objects (%s) but ONNX Runtime loads it; going on", path, first_line)
        return first_line


def _check_external_data(proto: onnx.ModelProto, path: Path) -> set[Path]:
    """Check every external reference of the model; returns the data files they name."""
    return {
        _resolve_external(tensor, path)[0]
        for tensor in iter_model_tensors(proto)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
    }


def _resolve_external(tensor: onnx.TensorProto, path: Path) -> tuple[Path, int, int]:
    """The file, offset and length of ``tensor``'s external data, checked to stay inside the model's folder.

    The one resolver of external references: a plain relative location of sane length that does
    not leave the folder, even through a symlink, names a regular file long enough for integer,
    non-negative offset and length.
    """
    base = path.parent.resolve()
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    where = f"{path}: tensor {tensor.name!r} has external data {location[:200]!r}"
    if (
        not location
        or len(location) > MAX_LOCATION_CHARS
        or "\0" in location
        or Path(location).is_absolute()
        or ".." in Path(location).parts
    ):
        raise ModelLoadError(
            f"{where}, which is not a plain path relative to the model's folder. "
            "Move the data file beside the model and re-save it with a relative location."
        )
    offset, length = (_external_int(info, key, where) for key in ("offset", "length"))
    try:
        target = (base / location).resolve()
        if not target.is_relative_to(base):
            raise ModelLoadError(
                f"{where}, which resolves outside the model's folder ({target}); "
                "a symlink points out. Copy the data file into the model's folder."
            )
        if not target.is_file():
            raise ModelLoadError(
                f"{where}, but {target} does not exist or is not a regular file. "
                "Copy the external data file beside the model."
            )
        status = target.stat()
        if status.st_nlink > 1:  # a hard link can reach a file outside the folder; onnx_ir refuses it too
            raise ModelLoadError(
                f"{where}, but {target} has {status.st_nlink} hard links, so it may be a file from outside the "
                "model's folder. Copy it (cp) so the model's folder holds its own copy."
            )
        size = status.st_size
    except OSError as exc:
        raise ModelLoadError(f"{where}, which cannot be opened ({exc.strerror}). Re-save the model.") from exc
    length = size - offset if length is None else length
    if offset + length > size:
        raise ModelLoadError(
            f"{where}, which needs {offset + length} bytes but the file has {size}: "
            "it is truncated. Copy the external data file again."
        )
    return target, offset, length


def _external_int(info: dict[str, str], key: str, where: str) -> int | None:
    """An external data entry's offset or length: a non-negative integer, or None when absent (offset: 0)."""
    value = info.get(key)
    if value is None:
        return 0 if key == "offset" else None
    if not (value.isascii() and value.isdigit()):
        raise ModelLoadError(
            f"{where} with {key} {value[:40]!r}, not a non-negative integer. Re-save the model with its exporter."
        )
    return int(value)


def _set_base_dir(model: ir.Model, base: Path) -> None:
    """Point every external tensor, functions' included, at the model's folder (not the current one)."""
    ir.external_data.set_base_dir(model.graph, base)
    for function in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(function):
            for tensor in _attribute_tensors(node):
                if isinstance(tensor, ir.ExternalTensor):
                    tensor.base_dir = base


def _attribute_tensors(node: ir.Node) -> list[ir.TensorProtocol]:
    tensors = []
    for attr in node.attributes.values():
        if attr.is_ref():
            continue
        if attr.type == ir.AttributeType.TENSOR:
            tensors.append(attr.value)
        elif attr.type == ir.AttributeType.TENSORS:
            tensors.extend(attr.value)
    return tensors


def _densify_sparse_initializers(graph: onnx.GraphProto, path: Path) -> int:
    """Turn sparse initializers into dense ones in place (onnx_ir would drop them)."""
    count = 0
    for sparse in list(graph.sparse_initializer):
        dense = _sparse_to_dense(sparse, path)
        graph.initializer.append(onnx.numpy_helper.from_array(dense, sparse.values.name))
        count += 1
    del graph.sparse_initializer[:]
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                count += _densify_sparse_initializers(sub, path)
    return count


def _sparse_to_dense(sparse: onnx.SparseTensorProto, path: Path) -> np.ndarray:
    values = onnx.numpy_helper.to_array(_inlined(sparse.values, path))
    indices = onnx.numpy_helper.to_array(_inlined(sparse.indices, path)).astype(np.int64)
    shape = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(int(np.prod(shape)), dtype=values.dtype)
    if indices.ndim == 2:  # [NNZ, rank] coordinates
        indices = np.ravel_multi_index(tuple(indices.T), shape)
    dense[indices] = values
    return dense.reshape(shape)


def _inlined(tensor: onnx.TensorProto, path: Path) -> onnx.TensorProto:
    """``tensor`` with its external data (read through the checked resolver) moved inline."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return tensor
    target, offset, length = _resolve_external(tensor, path)
    with target.open("rb") as handle:
        handle.seek(offset)
        raw = handle.read(length)
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    inline.ClearField("external_data")
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = raw
    return inline


def external_data_files(model: ir.Model) -> set[Path]:
    """Every external data file the model's tensors (initializers and node attributes, functions' too) are read from."""
    tensors = [value.const_value for graph in model.graphs() for value in graph.initializers.values()]
    for graph in [model.graph, *model.functions.values()]:
        tensors.extend(t for node in ir.traversal.RecursiveGraphIterator(graph) for t in _attribute_tensors(node))
    return {Path(t.path).resolve() for t in tensors if isinstance(t, ir.ExternalTensor)}


def source_files(model: ir.Model) -> tuple[Path, ...]:
    """The files ``model`` was loaded from: the .onnx file and every external data file it references.

    Recorded at load, so sparse initializers' data (densified then) still counts; empty for a
    model built in memory.
    """
    return tuple(model.meta.get(SOURCE_FILES, ()))


def save_model(
    model: ir.Model,
    path: str | os.PathLike[str],
    *,
    protect: Sequence[str | os.PathLike[str]] = (),
    external_data: bool | None = None,
    overwrite: bool = True,
    sparse: SparseMode = "auto",
    keep_debug_metadata: bool = False,
) -> SavedModel:
    """Check ``model`` and write it atomically to ``path``.

    Args:
        model: The model to write; it is not modified except that tensors read from the
            input's external data are loaded into memory when the output is inlined.
        path: Destination ``.onnx`` file; its folder must exist.
        protect: Files that must never be written over (the input model and the files it reads);
            compared by identity, so a symlink or hard link to one counts as that file.
        external_data: True to write tensors to ``<name>.data``; False to inline them;
            None (default) to use external data only when the model is over ~1.8 GB.
        overwrite: Whether an existing output (not a protected file) may be replaced.
        sparse: Which pruned float weights (main-graph initializers of rank >= 2 with at
            least 10% exact zeros) to store as COO sparse initializers: ``auto`` (default)
            those that get smaller, ``always`` all of them, ``never`` none. Written inline only, so with external
            data ``auto`` keeps them dense and ``always`` is an error. ONNX Runtime turns
            them back into dense tensors when it loads the model.
        keep_debug_metadata: Keep exporters' per-node debug annotations (PyTorch stack
            traces, FX node text, class hierarchies, onnxscript rule names). Dropped by
            default: nothing reads them at run time. Module scopes are always kept
            (adapter mapping reads them).
    """
    path = Path(path)
    use_external = model_bytes(model) > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    data_name = f"{path.name}.data" if use_external else None
    _check_sparse_mode(path, sparse, data_name)
    _check_destination(model, path, data_name, protect, overwrite)
    needed = max(model.ir_version or onnx.IR_VERSION, min_ir_version(model))
    ir_version = _target_ir_version(model, runtime.ir_ceiling(needed))
    sparse_names = sparse_candidates(model, sparse) if data_name is None and ir_version >= SPARSE_MIN_IR_VERSION else []
    with destinations.staging(path.parent) as tmp:
        tmp_path = tmp / path.name
        _write(model, tmp_path, data_name, ir_version, sparse_names, keep_debug_metadata)
        if data_name is not None:
            _read_from_written(model, tmp_path)
        _verify_written(tmp_path, model.meta.get(CHECKER_FAILURE))
        if data_name is not None:
            os.replace(tmp / data_name, path.parent / data_name)
        os.replace(tmp_path, path)
    if data_name is not None:
        ir.external_data.set_base_dir(model.graph, path.parent)
    data_path = path.parent / data_name if data_name else None
    size = path.stat().st_size + (data_path.stat().st_size if data_path else 0)
    logger.info("saved %s (%d bytes, IR %d, %d sparse initializers)", path, size, ir_version, len(sparse_names))
    return SavedModel(path, data_path, size, ir_version, len(sparse_names))


def _read_from_written(model: ir.Model, written: Path) -> None:
    """Main-graph initializers held in memory now read the data file just written (memory-mapped, same values).

    What a pass made (a large model's quantized weights) is then no longer held twice, in this process and in
    ONNX Runtime's load of the output that checks it: peak memory is the larger of the two, not their sum. Each
    tensor is mapped at once, so it stays readable if the write is abandoned and the file removed.
    """
    header = onnx.load(str(written), load_external_data=False)
    for tensor in header.graph.initializer:
        value = model.graph.initializers.get(tensor.name)
        if value is None or value.const_value is None or isinstance(value.const_value, ir.ExternalTensor):
            continue
        if tensor.data_location != onnx.TensorProto.EXTERNAL or value.const_value.dtype.bitwidth < 8:
            continue  # inline, or sub-byte codes that onnx_ir unpacks into a new array when mapped
        info = {entry.key: entry.value for entry in tensor.external_data}
        mapped = ir.ExternalTensor(
            info["location"],
            int(info.get("offset", 0)),
            int(info["length"]),
            value.const_value.dtype,
            shape=value.const_value.shape,
            name=value.const_value.name or tensor.name,
            base_dir=written.parent,
        )
        mapped.numpy()  # map it now (nothing is read): valid even after the staging folder is gone
        value.const_value = mapped


def _check_sparse_mode(path: Path, sparse: str, data_name: str | None) -> None:
    if sparse not in ("never", "auto", "always"):
        raise ModelSaveError(f"sparse={sparse!r} is not one of 'never', 'auto', 'always'.")
    if data_name is not None and sparse == "always":
        raise ModelSaveError(
            f"{path}: sparse initializers are written inline, but this model is saved with external data. "
            "Save it with external_data=False (models under 2 GB), or use sparse='auto' or 'never'."
        )


def sparse_candidates(model: ir.Model, sparse: SparseMode) -> list[str]:
    """Main-graph initializers that ``sparse`` stores as COO sparse initializers."""
    if sparse == "never":
        return []
    graph_inputs = {v.name for v in model.graph.inputs}
    names = []
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or name in graph_inputs or tensor.dtype not in _SPARSE_DTYPES or len(tensor.shape) < 2:
            continue
        nonzero = int(np.count_nonzero(tensor.numpy()))
        coo_bytes = nonzero * (int(tensor.dtype.itemsize) + SPARSE_INDEX_BYTES)
        pruned = nonzero < tensor.size and tensor.size - nonzero >= int(SPARSE_MIN_ZEROS * tensor.size)
        if pruned and (sparse == "always" or coo_bytes < tensor.nbytes):
            names.append(name)
    return names


def _to_sparse(graph: onnx.GraphProto, names: Sequence[str]) -> None:
    """Move the initializers ``names`` into ``graph.sparse_initializer`` (COO, linear int64 indices)."""
    wanted = set(names)
    dense = [t for t in graph.initializer if t.name not in wanted]
    for tensor in [t for t in graph.initializer if t.name in wanted]:
        array = onnx.numpy_helper.to_array(tensor)
        flat = array.reshape(-1)
        nonzero = np.flatnonzero(flat).astype(np.int64)
        values = onnx.numpy_helper.from_array(flat[nonzero], tensor.name)
        indices = onnx.numpy_helper.from_array(nonzero, f"{tensor.name}_indices")
        graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, list(array.shape)))
    del graph.initializer[:]
    graph.initializer.extend(dense)


def _check_destination(
    model: ir.Model,
    path: Path,
    data_name: str | None,
    protect: Sequence[str | os.PathLike[str]],
    overwrite: bool,
) -> None:
    reads = [("the input file", p) for p in [*protect, *source_files(model)]]
    reads += [("the input's external data", p) for p in external_data_files(model)]
    targets = [destinations.Destination("the output", path)]
    if data_name:
        targets.append(destinations.Destination("the output's data file", path.parent / data_name))
    destinations.check_destinations(targets, destinations.protected_files(reads))
    if path.exists() and not overwrite:
        raise ModelSaveError(f"{path}: already exists. Remove it or choose another output path.")


def _target_ir_version(model: ir.Model, runtime_max: int) -> int:
    wanted = min(model.ir_version or onnx.IR_VERSION, runtime_max)
    return max(wanted, min(min_ir_version(model), runtime_max))


def _write(
    model: ir.Model,
    tmp_path: Path,
    data_name: str | None,
    ir_version: int,
    sparse_names: Sequence[str],
    keep_debug_metadata: bool,
) -> None:
    original = model.ir_version
    model.ir_version = ir_version
    stripped = [] if keep_debug_metadata else _strip_debug_metadata(model)
    try:
        if data_name is None:
            # Tensors still mapped from the input's data file would be saved as references
            # to a file that is not beside the output: load them so the output is whole.
            ir.external_data.load_to_model(model)
            if sparse_names:
                # onnx_ir cannot write sparse initializers: convert the serialized proto.
                proto = ir.serde.serialize_model(model)
                _to_sparse(proto.graph, sparse_names)
                tmp_path.write_bytes(proto.SerializeToString())
            else:
                ir.save(model, tmp_path)
        else:
            ir.save(model, tmp_path, external_data=data_name, size_threshold_bytes=1024)
    except (OSError, ValueError) as exc:
        raise ModelSaveError(f"{tmp_path.parent}: could not write the model ({exc}).") from exc
    finally:
        model.ir_version = original
        for props, key, value in stripped:
            props[key] = value


# Debug text only; ``pkg.torch.onnx.name_scopes`` stays: it maps PEFT adapter modules to nodes.
DEBUG_METADATA_KEYS = frozenset(
    {
        "pkg.torch.onnx.stack_trace",
        "pkg.torch.onnx.class_hierarchy",
        "pkg.torch.onnx.fx_node",
        "namespace",
        "pkg.onnxscript.rewriter.rule_name",
    }
)


def _strip_debug_metadata(model: ir.Model) -> list[tuple[dict[str, str], str, str]]:
    """Remove exporter debug annotations from every node; returns what to put back."""
    removed = []
    graphs = [model.graph, *model.functions.values()]
    for graph in graphs:
        for node in ir.traversal.RecursiveGraphIterator(graph):
            props = node.metadata_props
            for key in [k for k in props if k in DEBUG_METADATA_KEYS]:
                removed.append((props, key, props.pop(key)))
    return removed


def _verify_written(tmp_path: Path, input_failure: str | None) -> None:
    try:  # ORT with its default optimizations, in a child process (ORT can crash on a graph), meanwhile ours
        with prober.probing(tmp_path):
            _check_written(tmp_path, input_failure)
    except ModelLoadError as exc:
        raise PassError(
            f"{exc} The output was not written; leave the changed nodes alone (the pass's exclude_op_types or "
            "exclude option) or run without that pass."
        ) from exc


def _check_written(tmp_path: Path, input_failure: str | None) -> None:
    """onnx.checker, then an in-process ONNX Runtime load without graph rewrites."""
    try:
        onnx.checker.check_model(str(tmp_path))
    except onnx.checker.ValidationError as exc:
        if input_failure is not None:  # the input failed the checker too: ONNX Runtime's load decides
            logger.warning("the output fails onnx.checker as the input did (%s); ONNX Runtime loads it", input_failure)
            runtime.check_loads(tmp_path)
            return
        raise ModelSaveError(
            f"the optimized model fails onnx.checker and was not written: {exc}. "
            "This is a graphopt bug; run with --check to find the pass that broke it."
        ) from exc
    runtime.check_loads(tmp_path)
