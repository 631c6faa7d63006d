"""What this x86 CPU can do natively, and which half-precision dtypes it would only emulate.

A bfloat16 or float16 matmul on a CPU without instructions for it is emulated through float32 conversions, and can
be many times slower than float32 itself (pytorch issue 146508 reports 44x and more on AVX2-only parts). The server
does not choose such a dtype by itself, and says so once when an operator asks for one.
"""

from __future__ import annotations

import platform
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Mapping

NATIVE_HALF_PRECISION: Mapping[torch.dtype, tuple[str, ...]] = MappingProxyType(
    {
        torch.bfloat16: ("avx512_bf16", "amx_bf16"),
        torch.float16: ("avx512_fp16", "amx_fp16"),
    }
)
"""The x86 instruction sets (named as in ``/proc/cpuinfo``) that compute a half-precision dtype: any one will do."""

REPORTED_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
"""The features that decide which kernels run; what ``describe_cpu`` lists for benchmarks and logs."""

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The instruction-set flags of this x86 CPU, or ``None`` where they cannot be read (another OS or architecture)."""
    if platform.machine().lower() not in {"x86_64", "amd64"}:
        return None
    flags = _cpuinfo_field(cpuinfo, "flags")
    return None if flags is None else frozenset(flags.split())


def _cpuinfo_field(cpuinfo: Path, name: str) -> str | None:
    """The value of the first ``name`` line of ``cpuinfo`` (the first processor's), or ``None``."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return None


def missing_native_support(dtype: torch.dtype, flags: frozenset[str] | None) -> tuple[str, ...]:
    """The instruction sets that would compute ``dtype`` natively, when ``flags`` has none of them; else ``()``.

    Unknown flags (``None``) and dtypes every CPU computes natively (float32, float64) give ``()``: nothing to warn of.
    """
    needed = NATIVE_HALF_PRECISION.get(dtype, ())
    if flags is None or not needed or any(flag in flags for flag in needed):
        return ()
    return needed


def describe_cpu(cpuinfo: Path = CPUINFO) -> str:
    """The CPU's model name and the kernel-deciding features it has, e.g. ``AMD EPYC (avx2)``."""
    name = _cpuinfo_field(cpuinfo, "model name") or platform.processor() or platform.machine()
    flags = cpu_flags(cpuinfo)
    if flags is None:
        return name
    present = [feature for feature in REPORTED_FEATURES if feature in flags]
    return f"{name} ({', '.join(present) or 'no AVX2'})"


__all__ = ["cpu_flags", "describe_cpu", "missing_native_support"]
