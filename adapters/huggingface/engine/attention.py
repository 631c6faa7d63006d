"""A verifying pass's attention, one query position at a time, so that it rounds as the one-token steps it replaces.

Speculation promises the output decoding without it gives. Every other part of a decoder layer computes a position
on its own: the linear layers (int8's give a token the same product in any call), the norms, rotary embeddings and
activations. Attention does not: over several new positions it runs another kernel path than over one (transformers
packs one query's heads onto the key heads, while several get a causal mask) and rounds differently. In float32 the
difference stays far below what changes a greedy token; an int8 step magnifies it (a last-bit difference can move
an input to the next of its 256 levels), and it changed greedy outputs. So while `one_query_at_a_time` is on, the
sdpa attention of a pass over ``T`` new positions makes ``T`` calls of one query each, with the keys and the mask a
one-token step at that position has: the same kernel over the same numbers. The pass costs ``T - 1`` more attention
calls a layer, small beside its weight reads.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

_state = threading.local()


@contextmanager
def one_query_at_a_time(active: bool = True) -> Iterator[None]:
    """While active, sdpa attention on this thread computes each new position as a one-token step would."""
    previous = getattr(_state, "active", False)
    _state.active = active
    try:
        yield
    finally:
        _state.active = previous


def per_query(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,  # noqa: ANN401  transformers' attention arguments, passed on
) -> tuple[torch.Tensor, None]:
    """The sdpa attention of transformers; inside `one_query_at_a_time`, one call per query position.

    ``query``: ``[batch, heads, T, dim]``, the last ``T`` of ``key``'s positions. Position ``j`` attends to the keys up
    to its own, under its row of the mask; a mask with nothing masked is left out, as transformers leaves it out of a
    one-token step.
    """
    positions = query.shape[2]
    if positions == 1 or not getattr(_state, "active", False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    length = key.shape[2]
    outputs = []
    for position in range(positions):
        end = length - positions + position + 1
        mask = None if attention_mask is None else attention_mask[:, :, position : position + 1, :end]
        if mask is not None and mask.dtype == torch.bool and bool(mask.all()):
            mask = None
        output, _ = sdpa_attention_forward(
            module, query[:, :, position : position + 1], key[:, :, :end], value[:, :, :end], mask, **kwargs
        )
        outputs.append(output)  # [batch, 1, heads, dim]
    return torch.cat(outputs, dim=1), None


def install() -> None:
    """Route transformers' ``sdpa`` attention through `per_query`, which is sdpa itself outside the switch."""
    AttentionInterface.register("sdpa", per_query)


__all__ = ["install", "one_query_at_a_time", "per_query"]
