"""Every use of torch's private API, in one place; ``tests/test_compat.py`` fails clearly when one moves.

oneDNN's prepacked linear layer is what inductor uses when it freezes a CPU model; torch offers it only as private ops.
"""

from __future__ import annotations

import torch


def reorder_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` reordered once into oneDNN's blocked layout (``torch.ops.mkldnn._reorder_linear_weight``)."""
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, None)  # noqa: SLF001  inductor's own op
    return packed


def linear_pointwise(inputs: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``inputs @ weight.T + bias`` over a weight from `reorder_linear_weight` (``mkldnn._linear_pointwise``)."""
    outputs: torch.Tensor = torch.ops.mkldnn._linear_pointwise(inputs, packed, bias, "none", [], "")  # noqa: SLF001
    return outputs


__all__ = ["linear_pointwise", "reorder_linear_weight"]
