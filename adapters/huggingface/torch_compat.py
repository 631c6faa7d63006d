"""Every use of torch's private API, in one place; ``tests/test_compat.py`` fails clearly when one moves.

oneDNN's prepacked linear layer is what inductor uses when it freezes a CPU model; torch offers it only as private ops.
The quantized linear layers (``adapters.huggingface.quantization``) use FBGEMM's dynamically quantized int8 product,
reached through per-channel quantized tensors that torch has deprecated, and the CPU's int4 weight-only product,
a private aten op. The engine's lean decoding pass (``adapters.huggingface.engine.decoder``) watches modules' private
hook and child dictionaries, to leave hooked models to their own forward and to notice a part set anew, and compiles
each layer's parts with TorchScript, which torch has deprecated.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

INT4_GROUP_SIZE = 32
"""Weights per scale and zero point in `pack_int4_weight` (GGUF's block size)."""

if TYPE_CHECKING:
    PackedInt8Weight = torch.ScriptObject
else:  # the class of FBGEMM's packed weights, for TorchScript to read in `linear_int8_dynamic`'s signature
    PackedInt8Weight = torch.classes.quantized.LinearPackedParamsBase


def reorder_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` reordered once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``)."""
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, None)  # noqa: SLF001  inductor's own op
    return packed


def linear_pointwise(inputs: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``inputs @ weight.T + bias`` over a weight from `reorder_linear_weight` (``mkldnn._linear_pointwise``)."""
    outputs: torch.Tensor = torch.ops.mkldnn._linear_pointwise(inputs, packed, bias, "none", [], "")  # noqa: SLF001
    return outputs


def pack_int8_dynamic_weight(weight: torch.Tensor, bias: torch.Tensor | None) -> PackedInt8Weight:
    """``weight`` (float32, ``[out, in]``) quantized to int8 per output row and packed for FBGEMM.

    Symmetric: each row's scale is its largest magnitude over 127. ``torch.quantize_per_channel`` warns that it is
    deprecated; the warning is silenced here, where the canary in ``tests/test_compat.py`` watches the op.
    """
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny).double()
    zero_points = torch.zeros(weight.shape[0], dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_channel(weight.float(), scales, zero_points, 0, torch.qint8)
        packed: PackedInt8Weight = torch.ops.quantized.linear_prepack(quantized, bias)
    return packed


def linear_int8_dynamic(
    inputs: torch.Tensor,
    packed: PackedInt8Weight,
    *,
    reduce_range: bool,
) -> torch.Tensor:
    """``inputs @ weight.T + bias`` with ``inputs`` quantized per call (``quantized::linear_dynamic``).

    ``reduce_range``: the inputs take 7 bits instead of 8, so that kernels summing pairs of products in 16 bits
    (AVX2's, AVX-512's without VNNI) cannot saturate. ``packed``'s annotation names the op's class, which
    TorchScript needs (`script`).
    """
    outputs: torch.Tensor = torch.ops.quantized.linear_dynamic(inputs, packed, reduce_range)
    return outputs


def pack_int4_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (``[out, in]``) as 4-bit codes in groups of `INT4_GROUP_SIZE`, packed for the CPU kernel.

    Asymmetric per group (min to max in 16 steps). Returns the packed codes and the ``[groups, out, 2]`` scales
    and zero points ``_weight_int4pack_mm_for_cpu`` reads (a weight is ``(code - 8) * scale + zero``).
    """
    rows, columns = weight.shape
    groups = weight.float().reshape(rows, columns // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    low = groups.amin(dim=-1, keepdim=True)
    scale = ((groups.amax(dim=-1, keepdim=True) - low) / 15).clamp(min=1e-8)
    codes = ((groups - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(rows, columns)
    zero = low + 8 * scale
    scales_and_zeros = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous()
    packed: torch.Tensor = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)  # noqa: SLF001
    return packed, scales_and_zeros


def linear_int4(
    inputs: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int = INT4_GROUP_SIZE
) -> torch.Tensor:
    """``inputs @ weight.T`` over a weight from `pack_int4_weight` (``aten._weight_int4pack_mm_for_cpu``, 2-D only).

    ``group_size``: always `INT4_GROUP_SIZE`; an argument because TorchScript reads no global (`script`).
    """
    flat = inputs.reshape(-1, inputs.shape[-1])
    outputs: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(  # noqa: SLF001
        flat, packed, group_size, scales_and_zeros
    )
    return outputs.reshape(list(inputs.shape[:-1]) + [outputs.shape[-1]])  # noqa: RUF005  no starred list in TorchScript


def script(module: nn.Module) -> nn.Module | None:
    """``module`` compiled by TorchScript (``torch.jit.script``), or ``None`` where it cannot be compiled.

    A compiled module runs its ops, and its submodules', from C++: no Python between two ops. Torch 2.13 deprecates
    TorchScript for ``torch.compile``, which compiles for a minute and once per shape (README, "What was tried"); the
    warning is silenced here, and the canary in ``tests/test_compat.py`` checks that it still compiles and gives the
    same numbers. The compiled module shares ``module``'s parameters and buffers.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return torch.jit.script(module)
        except Exception:  # noqa: BLE001  TorchScript raises many kinds; the caller keeps the module as it is
            return None


def forward_hooks_watch(modules: Iterable[nn.Module]) -> Callable[[], bool]:
    """A check, to call as often as needed, of whether a forward hook or pre-hook waits on any of ``modules``.

    Or on every module (torch's globals). It holds ``nn.Module``'s hook dictionaries, which torch keeps private and
    fills and empties in place, so a call is one pass over them in C: the lean decoder asks before every step, about
    its layers' 450 modules (reading them module by module took a quarter of a millisecond of each step).
    """
    dictionaries = tuple(
        hooks
        for module in dict.fromkeys(modules)
        for hooks in (module._forward_hooks, module._forward_pre_hooks)  # noqa: SLF001
    )

    def hooked() -> bool:
        if module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks:  # noqa: SLF001
            return True
        return any(dictionaries)

    return hooked


def children_watch(modules: Iterable[nn.Module]) -> Callable[[], bool]:
    """A check of whether any of ``modules`` has had a child module set, replaced or removed since the watch was made.

    It compares the modules' child dictionaries (private to ``nn.Module``, which sets children in them in place)
    with what they held: 29 us for SmolLM2's 30 layers and their blocks, where looking up the lean decoder's parts
    layer by layer took 290 us of each step.
    """
    dictionaries = tuple(module._modules for module in dict.fromkeys(modules))  # noqa: SLF001
    held = tuple(tuple(children.items()) for children in dictionaries)

    def changed() -> bool:
        return tuple(tuple(children.items()) for children in dictionaries) != held

    return changed


__all__ = [
    "INT4_GROUP_SIZE",
    "children_watch",
    "forward_hooks_watch",
    "linear_int4",
    "linear_int8_dynamic",
    "linear_pointwise",
    "pack_int4_weight",
    "pack_int8_dynamic_weight",
    "reorder_linear_weight",
    "script",
]
