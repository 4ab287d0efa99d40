"""Read PEFT LoRA adapter folders and combine several into one low-rank update per module.

A folder written by PEFT's ``save_pretrained`` holds ``adapter_config.json`` (r, lora_alpha,
use_rslora, alpha_pattern, target_modules, fan_in_fan_out) and ``adapter_model.safetensors``
with ``base_model.model.<module>.lora_A.weight`` [r, in(, *k)] and ``...lora_B.weight``
[out, r(, 1, ...)]. Tensors are read with the ``safetensors`` package's numpy API; bfloat16
tensors, which numpy cannot hold, are widened to float32 from the raw file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from graphopt.errors import DataError

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<part>A|B)(?:\.(?P<name>[^.]+))?\.weight$")


@dataclass(frozen=True)
class LoraFactors:
    """One module's update ``B @ A`` with every scale folded into A."""

    a: np.ndarray  # [r, in(, *k)]
    b: np.ndarray  # [out, r(, 1, ...)]

    def delta(self) -> np.ndarray:
        """The update in torch layout: [out, in] for Linear, [out, in, *k] for Conv."""
        a, b = self.a.astype(np.float64), self.b.astype(np.float64)
        flat = b.reshape(b.shape[0], b.shape[1]) @ a.reshape(a.shape[0], -1)
        return flat.reshape((b.shape[0], *a.shape[1:]))


@dataclass(frozen=True)
class Adapter:
    """A loaded PEFT LoRA adapter: per-module factors and scaling, and the keys it cannot merge."""

    path: Path
    factors: Mapping[str, LoraFactors]  # unscaled lora_A / lora_B
    scaling: Mapping[str, float]
    unsupported: tuple[str, ...]
    digest: str

    @property
    def modules(self) -> list[str]:
        return sorted(self.factors)


def load_adapter(path: str | Path) -> Adapter:
    """Load a PEFT adapter folder; DataError naming the file and the fix when it is not one."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(
            f"merge_lora: adapter folder {folder} does not exist. Give the folder PEFT's save_pretrained "
            f"wrote ({CONFIG_FILE} + {WEIGHTS_FILE})."
        )
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for needed in (config_path, weights_path):
        if not needed.is_file():
            hint = " Re-save it with safe_serialization=True." if (folder / "adapter_model.bin").exists() else ""
            raise DataError(f"merge_lora: adapter folder {folder} has no {needed.name}.{hint}")
    config = _read_config(config_path)
    tensors = read_safetensors(weights_path)
    factors, unsupported = _factors(tensors, weights_path)
    scaling = {name: _scaling(config, name, f.a.shape[0], config_path) for name, f in factors.items()}
    digest = hashlib.sha256(weights_path.read_bytes() + config_path.read_bytes()).hexdigest()
    logger.info("merge_lora: adapter %s: %d modules", folder, len(factors))
    return Adapter(folder, factors, scaling, tuple(unsupported), digest)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"merge_lora: {path} is not valid JSON ({exc}). Re-save the adapter with PEFT.") from exc
    if not isinstance(config, dict):
        raise DataError(f"merge_lora: {path} must hold a JSON object, as PEFT writes it.")
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise DataError(f"merge_lora: {path}: peft_type is {peft_type!r}; only LoRA adapters can be merged.")
    if config.get("use_dora"):
        raise DataError(f"merge_lora: {path}: use_dora is true; DoRA adapters are not supported, only plain LoRA.")
    _expect(config, "r", (int,), path, required=True)
    _expect(config, "lora_alpha", (int, float), path, required=True)
    for key in ("use_rslora", "fan_in_fan_out"):
        _expect(config, key, (bool,), path)
    for key in ("alpha_pattern", "rank_pattern"):
        _expect(config, key, (dict,), path)
    for name, alpha in (config.get("alpha_pattern") or {}).items():
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            raise DataError(f"merge_lora: {path}: alpha_pattern[{name!r}] must be a number; got {alpha!r}.")
    return config


def _expect(config: Mapping[str, Any], key: str, types: tuple[type, ...], path: Path, required: bool = False) -> None:
    value = config.get(key)
    if value is None and not required:
        return
    ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
    if not ok:
        wanted = " or ".join(t.__name__ for t in types)
        raise DataError(f"merge_lora: {path}: {key} must be {wanted}; got {value!r}. Fix the adapter config.")


def _scaling(config: Mapping[str, Any], module: str, rank: int, path: Path) -> float:
    """PEFT's scaling: lora_alpha / r, or / sqrt(r) with rsLoRA; alpha_pattern overrides alpha."""
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    if rank <= 0:
        raise DataError(f"merge_lora: {path}: module {module} has rank {rank}.")
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _factors(tensors: Mapping[str, np.ndarray], path: Path) -> tuple[dict[str, LoraFactors], list[str]]:
    parts: dict[str, dict[str, np.ndarray]] = {}
    unsupported = []
    for key, array in tensors.items():
        match = _KEY.match(key)
        if match is None:
            unsupported.append(key)
            continue
        parts.setdefault(match["module"], {})[match["part"]] = array
    factors = {}
    for module, pair in sorted(parts.items()):
        if set(pair) != {"A", "B"}:
            raise DataError(f"merge_lora: {path}: module {module} has lora_{''.join(pair)} but not its pair.")
        a, b = pair["A"], pair["B"]
        if a.ndim < 2 or b.ndim != a.ndim or b.shape[1] != a.shape[0]:
            raise DataError(f"merge_lora: {path}: module {module}: lora_A {a.shape} and lora_B {b.shape} do not chain.")
        factors[module] = LoraFactors(a, b)
    return factors, unsupported


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (bfloat16 widened to float32)."""
    header, size = _header(path)
    _check_entries(path, header, path.stat().st_size - 8 - size)
    if not any(entry.get("dtype") == "BF16" for key, entry in header.items() if key != "__metadata__"):
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise DataError(f"merge_lora: {path} cannot be read ({exc}). Save the adapter again.") from exc
    return _read_raw(path, header, 8 + size)


def _header(path: Path) -> tuple[dict[str, Any], int]:
    with path.open("rb") as handle:
        raw = handle.read(8)
        size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if size <= 0 or size > 100_000_000:
            raise DataError(f"merge_lora: {path} is not a safetensors file. Save the adapter again.")
        try:
            return json.loads(handle.read(size)), size
        except ValueError as exc:
            raise DataError(f"merge_lora: {path} has a broken header. Save the adapter again.") from exc


def _check_entries(path: Path, header: Any, data_bytes: int) -> None:
    """Every tensor entry names a dtype, a shape and a byte range inside the file that fits them."""
    if not isinstance(header, dict):
        raise DataError(f"merge_lora: {path}: the header is not a JSON object. Save the adapter again.")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes
        ):
            raise DataError(
                f"merge_lora: {path}: tensor {key} has a broken entry (shape, data_offsets) or lies past the "
                f"end of the file ({data_bytes} data bytes): it is truncated or corrupt. Save the adapter again."
            )
        itemsize = _ITEMSIZE.get(entry.get("dtype"))
        if itemsize is not None and math.prod(shape) * itemsize != offsets[1] - offsets[0]:
            raise DataError(
                f"merge_lora: {path}: tensor {key} declares shape {shape} of {entry['dtype']} but holds "
                f"{offsets[1] - offsets[0]} bytes. Save the adapter again."
            )


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_RAW_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}


def _read_raw(path: Path, header: Mapping[str, Any], offset: int) -> dict[str, np.ndarray]:
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset)
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if entry["dtype"] not in _RAW_TYPES:
            raise DataError(f"merge_lora: {path}: tensor {key} has type {entry['dtype']}; expected float.")
        start, stop = entry["data_offsets"]
        array = np.frombuffer(data[start:stop].tobytes(), dtype=_RAW_TYPES[entry["dtype"]]).reshape(entry["shape"])
        if entry["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[key] = array
    return tensors


def combine(adapters: Sequence[Adapter], weights: Sequence[float], combination: str) -> dict[str, LoraFactors]:
    """One low-rank update per module from several weighted adapters.

    ``linear`` is PEFT's ``add_weighted_adapter(combination_type="linear")``: A and B are
    each a weighted sum (weights sqrt(|w·s|), the sign on A), so adapters must share a
    rank and the product has cross terms. ``cat`` stacks the ranks: exactly sum(w·s·B·A).
    A module missing from some adapters combines the adapters that have it.
    """
    modules = sorted({m for adapter in adapters for m in adapter.factors})
    combined = {}
    for module in modules:
        present = [
            (a.factors[module], w * a.scaling[module])
            for a, w in zip(adapters, weights, strict=True)
            if module in a.factors
        ]
        if len(present) == 1 or combination == "cat":
            a = np.concatenate([f.a.astype(np.float64) * ws for f, ws in present], axis=0)
            b = np.concatenate([f.b.astype(np.float64) for f, _ in present], axis=1)
        else:
            ranks = {f.a.shape[0] for f, _ in present}
            if len(ranks) != 1:
                raise DataError(
                    f"merge_lora: module {module} has ranks {sorted(ranks)} across adapters; combination='linear' "
                    "needs equal ranks (as PEFT does). Use combination='cat'."
                )
            a = sum(math.copysign(math.sqrt(abs(ws)), ws) * f.a.astype(np.float64) for f, ws in present)
            b = sum(math.sqrt(abs(ws)) * f.b.astype(np.float64) for f, ws in present)
        combined[module] = LoraFactors(np.asarray(a), np.asarray(b))
    return combined
