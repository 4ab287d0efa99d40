"""The devices graphopt runs on, and what this CPU offers ONNX Runtime's integer kernels (read from the OS)."""

from __future__ import annotations

import platform
from pathlib import Path

DEVICES = ("cpu", "cuda")
# Integer dot-product instructions, by the flag names Linux reports in /proc/cpuinfo.
_X86_DOT = {"avx512_vnni": "AVX512-VNNI", "avx_vnni": "AVX-VNNI", "amx_int8": "AMX-INT8"}
_ARM_DOT = {"asimddp": "dot product (SDOT/UDOT)", "i8mm": "int8 matrix multiply (I8MM)"}


def _x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags as the OS reports them (x86 ``flags``, ARM ``Features``); None when unknown."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return None


def u8s8_saturates() -> bool:
    """Whether ORT's uint8 x int8 kernels can saturate on this CPU (x86-64 without VNNI).

    Without VNNI, MLAS sums pairs of u8*s8 products in int16 (vpmaddubsw), which
    overflows for large values; 7-bit weights (reduce_range) keep the sums in range.
    """
    if not _x86():
        return False
    flags = cpu_flags()
    if flags is None:
        return True  # unknown x86 CPU: assume the common case without VNNI
    return not any(flag in flags for flag in _X86_DOT)


def describe_cpu() -> str:
    """What this CPU offers int8 kernels, in words ("x86_64 with AVX2, no VNNI")."""
    machine = platform.machine() or "unknown machine"
    flags = cpu_flags()
    if flags is None:
        return f"{machine} (its instruction set could not be read)"
    table = _X86_DOT if _x86() else _ARM_DOT
    found = [name for flag, name in table.items() if flag in flags]
    if _x86():
        vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE only"
        return f"{machine} with {vector}, " + (", ".join(found) if found else "no VNNI")
    return f"{machine} with " + (", ".join(found) if found else "no int8 dot-product instructions")
