"""Load and save models: the only module of graphopt that touches protobufs.

Loading checks the file before anything else reads it: it must exist, parse as an ONNX
model, pass ``onnx.checker`` and keep all its external data inside the model's folder.
External data stays memory-mapped by onnx_ir; sparse initializers (which onnx_ir would
drop) are densified into ordinary initializers so nothing is lost.

Saving never writes over the input: it writes into a temporary folder beside the
destination, checks the result with ``onnx.checker`` and an ONNX Runtime load, and only
then renames the files into place. Pruned weights can be stored as sparse initializers
(COO): onnx_ir 1.1 can neither read nor write them, so the conversion is the very last
step, on the protobuf about to be written. onnx.checker accepts only int64 indices, which
makes a 50%-dense float32 weight 1.5x its dense size, and ONNX Runtime densifies sparse
initializers when it loads them: they save disk, not memory or time.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
from google.protobuf.message import DecodeError

from graphopt import runtime
from graphopt.errors import ModelLoadError, ModelSaveError, PassError
from graphopt.serialize import (  # re-exported: io is where users look for them
    EXTERNAL_DATA_THRESHOLD,
    SPARSE_INDEX_BYTES,
    iter_tensors,
    min_ir_version,
    model_bytes,
)

logger = logging.getLogger(__name__)

# model.meta key: what onnx.checker said about an input that only ONNX Runtime accepts
CHECKER_FAILURE = "graphopt.checker_failure"
_TEMP_PREFIX = ".graphopt-"
# A temporary folder this old beside an output was left by a save that was killed.
STALE_TEMP_SECONDS = 3600

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
    _check_external_data(proto, path)
    checker_failure = _run_checker(path)
    densified = _densify_sparse_initializers(proto.graph)
    if densified:
        logger.info("densified %d sparse initializer(s) of %s", densified, path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as exc:  # onnx_ir raises several types on malformed graphs
        raise ModelLoadError(
            f"{path}: the graph cannot be read ({type(exc).__name__}: {exc}). "
            "Re-export the model; `python -m onnx.checker` shows the first structural problem."
        ) from exc
    ir.external_data.set_base_dir(model.graph, path.parent.resolve())
    if checker_failure:
        model.meta[CHECKER_FAILURE] = checker_failure
    names = [n.name for n in model.graph if n.name]
    if len(names) != len(set(names)):
        # ONNX allows duplicate node names but ONNX Runtime refuses them; values keep their names.
        ir.passes.common.NameFixPass()(model)
        logger.info("%s: renamed duplicate node names so ONNX Runtime accepts the model", path)
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


def _check_external_data(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse external data that escapes the model folder, is missing or is too short."""
    base = path.parent.resolve()
    for tensor in iter_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"{path}: tensor {tensor.name!r} has external data {location!r}"
        if not location or Path(location).is_absolute() or ".." in Path(location).parts:
            raise ModelLoadError(
                f"{where}, which is not a plain path relative to the model's folder. "
                "Move the data file beside the model and re-save it with a relative location."
            )
        target = (base / location).resolve()
        if not target.is_relative_to(base):
            raise ModelLoadError(
                f"{where}, which resolves outside the model's folder ({target}); "
                "a symlink points out. Copy the data file into the model's folder."
            )
        if not target.is_file():
            raise ModelLoadError(f"{where}, but {target} does not exist. Copy the external data file beside the model.")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > target.stat().st_size:
            raise ModelLoadError(
                f"{where}, which needs {end} bytes but the file has {target.stat().st_size}: "
                "it is truncated. Copy the external data file again."
            )


def _densify_sparse_initializers(graph: onnx.GraphProto) -> int:
    """Turn sparse initializers into dense ones in place (onnx_ir would drop them)."""
    count = 0
    for sparse in list(graph.sparse_initializer):
        dense = _sparse_to_dense(sparse)
        graph.initializer.append(onnx.numpy_helper.from_array(dense, sparse.values.name))
        count += 1
    del graph.sparse_initializer[:]
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                count += _densify_sparse_initializers(sub)
    return count


def _sparse_to_dense(sparse: onnx.SparseTensorProto) -> np.ndarray:
    values = onnx.numpy_helper.to_array(sparse.values)
    indices = onnx.numpy_helper.to_array(sparse.indices).astype(np.int64)
    shape = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(int(np.prod(shape)), dtype=values.dtype)
    if indices.ndim == 2:  # [NNZ, rank] coordinates
        indices = np.ravel_multi_index(tuple(indices.T), shape)
    dense[indices] = values
    return dense.reshape(shape)


def external_data_files(model: ir.Model) -> set[Path]:
    """Every external data file the model's tensors are read from."""
    files = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                files.add(Path(tensor.path).resolve())
    return files


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
        protect: Files that must never be written over (the input model).
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
    _remove_stale_temporaries(path.parent)
    with tempfile.TemporaryDirectory(prefix=_TEMP_PREFIX, dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        _write(model, tmp_path, data_name, ir_version, sparse_names, keep_debug_metadata)
        _verify_written(tmp_path, model.meta.get(CHECKER_FAILURE))
        if data_name is not None:
            os.replace(Path(tmp) / data_name, path.parent / data_name)
        os.replace(tmp_path, path)
    data_path = path.parent / data_name if data_name else None
    size = path.stat().st_size + (data_path.stat().st_size if data_path else 0)
    logger.info("saved %s (%d bytes, IR %d, %d sparse initializers)", path, size, ir_version, len(sparse_names))
    return SavedModel(path, data_path, size, ir_version, len(sparse_names))


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


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete temporary folders that a killed save left behind (old enough to be nobody's now)."""
    now = time.time()
    for entry in folder.glob(f"{_TEMP_PREFIX}*"):
        try:
            if entry.is_dir() and not entry.is_symlink() and now - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                shutil.rmtree(entry)
                logger.info("removed %s, left by an interrupted save", entry)
        except OSError:
            continue


def _check_destination(
    model: ir.Model,
    path: Path,
    data_name: str | None,
    protect: Sequence[str | os.PathLike[str]],
    overwrite: bool,
) -> None:
    if not path.parent.is_dir():
        raise ModelSaveError(f"{path}: folder {path.parent} does not exist. Create it first.")
    if path.is_dir():
        raise ModelSaveError(f"{path}: is a folder. Give a file name such as {path / 'model.onnx'}.")
    guarded = {Path(p).resolve() for p in protect} | external_data_files(model)
    targets = [path] + ([path.parent / data_name] if data_name else [])
    for target in targets:
        if target.resolve() in guarded:
            raise ModelSaveError(
                f"{target}: would write over the input model or its data. Choose another output path (-o)."
            )
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
    try:  # and with ORT's default optimizations, in a child process: ORT can crash on a graph
        runtime.probe_load(tmp_path)
    except ModelLoadError as exc:
        raise PassError(
            f"{exc} The output was not written; leave the changed nodes alone (the pass's exclude_op_types or "
            "exclude option) or run without that pass."
        ) from exc
