"""Which torch device and dtype to run on, from what the operator asked for and what the machine can do."""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import TYPE_CHECKING

import structlog
import torch

from adapters.huggingface.cpu_features import cpu_flags, missing_native_support

if TYPE_CHECKING:
    from collections.abc import Mapping

log = structlog.get_logger(__name__)

DTYPE_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "fp32": "float32",
        "float32": "float32",
        "float": "float32",
        "fp16": "float16",
        "half": "float16",
        "float16": "float16",
        "bf16": "bfloat16",
        "bfloat16": "bfloat16",
        "fp64": "float64",
        "double": "float64",
        "float64": "float64",
    }
)
"""User spellings (lower case) of a dtype, mapped to the canonical torch name."""

DEVICE_CHOICES = ("auto", "cuda", "cpu")


def parse_dtype(name: str) -> str:
    """Return the canonical dtype name ("float32", "float16", "bfloat16", "float64") for a spelling like "BF16"."""
    canonical = DTYPE_ALIASES.get(name.strip().lower())
    if canonical is None:
        accepted = ", ".join(DTYPE_ALIASES)
        msg = f"unknown dtype {name!r}; accepted spellings (any case): {accepted}"
        raise ValueError(msg)
    return canonical


def resolve_device(requested: str) -> torch.device:
    """Return the device for "auto" (CUDA when available, else CPU), "cuda" (or "cuda:N") or "cpu".

    Asking for CUDA on a machine without it logs a warning and falls back to the CPU, so a config written for a GPU
    host still starts on a laptop.
    """
    choice = requested.strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        if torch.cuda.is_available():
            return torch.device(choice)
        log.warning("device.fallback", requested=requested, using="cpu", reason="CUDA is not available")
        return torch.device("cpu")
    msg = f"unknown device {requested!r}; choose one of: {', '.join(DEVICE_CHOICES)}"
    raise ValueError(msg)


def default_dtype(device: torch.device) -> torch.dtype:
    """Return bfloat16 on a GPU that supports it, else float16 on a GPU; float32 on the CPU.

    Never a half-precision dtype on the CPU: most CPUs only emulate it, many times slower than float32.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_dtype(
    requested: str | None,
    device: torch.device,
    *,
    flags: Callable[[], frozenset[str] | None] = cpu_flags,
) -> torch.dtype:
    """Return the requested dtype when ``device`` can run it, else the device's default (with a warning).

    A half-precision dtype asked for on a CPU that only emulates it (``flags`` lacks its instructions) is used, with
    a WARNING (``dtype.slow_on_cpu``) naming what the CPU lacks.

    Raises:
        ValueError: ``requested`` is not a known dtype spelling.

    """
    fallback = default_dtype(device)
    if requested is None:
        return fallback
    dtype: torch.dtype = getattr(torch, parse_dtype(requested))
    if _runs_on(device, dtype):
        if device.type == "cpu" and (missing := missing_native_support(dtype, flags())):
            log.warning(
                "dtype.slow_on_cpu",
                dtype=str(dtype).removeprefix("torch."),
                lacks=", ".join(missing),
                advice="this CPU emulates the dtype through float32 and may run many times slower: prefer fp32",
            )
        return dtype
    log.warning("dtype.fallback", requested=requested, device=str(device), using=str(fallback).removeprefix("torch."))
    return fallback


def _runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Tell whether ``device`` can do a matmul in ``dtype``: the one operation every forward pass needs."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        return False
    try:
        square = torch.ones((2, 2), dtype=dtype, device=device)
        (square @ square).sum().item()
    except (RuntimeError, TypeError):
        return False
    return True
