"""The devices graphopt runs on, and what this CPU offers ONNX Runtime's integer kernels (read from the OS)."""

from __future__ import annotations

import platform
from pathlib import Path

DEVICES = ("cpu", "cuda")


def u8s8_saturates() -> bool:
    """Whether ORT's uint8 x int8 kernels can saturate on this CPU (x86-64 without VNNI).

    Without VNNI, MLAS sums pairs of u8*s8 products in int16 (vpmaddubsw), which
    overflows for large values; 7-bit weights (reduce_range) keep the sums in range.
    """
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True  # unknown x86 CPU: assume the common case without VNNI
    return not any(flag in flags.split() for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))
