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

One query position's attention on a CPU (a decoding step's, and each of a verifying pass's) takes torch's grouped
path (``enable_gqa``) under a mask too (`one_query`), where transformers lays the query heads of a key head out as
its positions once a mask is given (that layout is for CUDA, whose grouped kernel is the slow math one under a
mask). On the CPU, torch's flash kernel takes the grouped heads and the mask together, and was faster: at SmolLM2's
shapes (9 query heads on 3 key heads) a batch of 4 rows over 100 columns took 39 against 81 µs a layer, a batch of
16 131 against 184 µs (2-core AMD EPYC with AVX-512). `per_query` sends transformers' forward through the same
function, so the lean decoder and transformers' forward still agree bit for bit (`decoder.probe` checks it).

On a model whose attention blocks take our kernel (`native.use_own_attention`), several new positions go to it in
one call, each as a one-token step at its place (`own_positions`): a verifying pass's, and a prefill's too, so that
a prompt rounds as decoding it token by token would, and the lean decoder can run it in one op.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from adapters.huggingface import native

_state = threading.local()

GROUPED_SDPA_LARGEST_DIM = 256
"""The largest head size transformers hands to torch's grouped-query attention (``use_gqa_in_sdpa``)."""


@contextmanager
def one_query_at_a_time(active: bool = True) -> Iterator[None]:
    """While active, sdpa attention on this thread computes each new position as a one-token step would."""
    previous = getattr(_state, "active", False)
    _state.active = active
    try:
        yield
    finally:
        _state.active = previous


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
"""``(query, key, value, mask) -> output`` for one query position: ``[batch, heads, 1, dim]`` in, ``[batch, 1, heads,
dim]`` out."""


def per_query(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,  # noqa: ANN401  transformers' attention arguments, passed on
) -> tuple[torch.Tensor, None]:
    """The sdpa attention of transformers; inside `one_query_at_a_time`, one call per query position (`each_query`).

    One query position goes to `one_query` where it applies (`one_position`), as the lean decoder's do; several go
    to our kernel in one call where it applies (`own_positions`), each as a one-token step at its place.
    """
    if query.shape[2] > 1:
        output = own_positions(module, query, key, value, attention_mask, options=kwargs)
        if output is not None:
            return output, None
    if query.shape[2] > 1 and not getattr(_state, "active", False):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    attend = one_position(module, query, kwargs)
    if query.shape[2] == 1:
        return attend(query, key, value, attention_mask), None
    return each_query(query, key, value, attention_mask, attend), None


def own_positions(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    options: dict[str, Any],
) -> torch.Tensor | None:
    """Several new positions' causal attention by our kernel, each as a one-token step at its place, or ``None``.

    For an attention block `native.use_own_attention` marked (a model on our kernels), on the CPU, causal, with only
    the arguments (``options``, transformers') that `one_position` lets through, and shapes our kernel takes; without
    a mask only where the positions are every column (transformers leaves the mask out of a whole unpadded prompt).
    A prefill then rounds as the decoding steps and verifying passes do, which lets the lean decoder run it in one
    op (`LeanDecoder.prefill`).
    """
    plain = not options.get("dropout") and options.get("position_bias") is None and options.get("softcap") is None
    causal = options.get("is_causal", getattr(module, "is_causal", True))
    if not (plain and causal and getattr(module, native.OWN_ATTENTION, False) and query.device.type == "cpu"):
        return None
    if (mask is None and query.shape[2] != key.shape[2]) or not native.attends(query, key, mask):
        return None
    scaling = options.get("scaling")
    return native.one_query_attention(query, key, value, mask, query.shape[-1] ** -0.5 if scaling is None else scaling)


def one_position(module: torch.nn.Module, query: torch.Tensor, kwargs: dict[str, Any]) -> Attend:
    """The attention of one of ``query``'s positions in ``module``, called with transformers' arguments ``kwargs``.

    `one_query` on the CPU for an attention block with grouped key heads (``num_key_value_groups``) and the arguments
    `one_query` honours: ``sdpa_attention_forward`` reads only ``scaling`` of the rest when there is no dropout, no
    position bias and no soft-capping (which it refuses), and ``is_causal`` only for several positions. Transformers'
    ``sdpa_attention_forward`` otherwise.
    """
    groups = getattr(module, "num_key_value_groups", None)
    plain = not kwargs.get("dropout") and kwargs.get("position_bias") is None and kwargs.get("softcap") is None
    if query.device.type == "cpu" and isinstance(groups, int) and plain:
        own = getattr(module, native.OWN_ATTENTION, False)
        return functools.partial(one_query, groups=groups, scaling=kwargs.get("scaling"), own=own)

    def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        output: torch.Tensor = sdpa_attention_forward(module, query, key, value, mask, **kwargs)[0]
        return output

    return attend


def each_query(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None, attend: Attend
) -> torch.Tensor:
    """Attention over ``T`` new positions as ``T`` one-token steps: ``[batch, T, heads, dim]``.

    ``query``: ``[batch, heads, T, dim]``, the last ``T`` of ``key``'s positions. Position ``j`` attends to the keys up
    to its own, under its row of the (boolean, ``[batch, 1, T, columns]``) mask; a mask with nothing masked is left
    out, as transformers leaves it out of a one-token step.
    """
    positions = query.shape[2]
    if positions == 1:
        return attend(query, key, value, attention_mask)
    length = key.shape[2]
    outputs = []
    for position in range(positions):
        end = length - positions + position + 1
        mask = None if attention_mask is None else attention_mask[:, :, position : position + 1, :end]
        if mask is not None and mask.dtype == torch.bool and bool(mask.all()):
            mask = None
        outputs.append(attend(query[:, :, position : position + 1], key[:, :, :end], value[:, :, :end], mask))
    return torch.cat(outputs, dim=1)


def whole_prompt(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Transformers' sdpa attention of a prefill's new positions, as a Llama-style layer's forward calls it.

    ``query``: ``[batch, heads, positions, dim]``; ``mask``: what `transformers_compat.causal_mask` built (``None``:
    causal). Returns ``[batch, positions, heads, dim]``. The call goes to the ``sdpa`` function registered with
    transformers, as its forward's does: `per_query` where the engine installed it (which hands a single position to
    `one_query`), transformers' own otherwise.
    """
    scaling = getattr(module, "scaling", None)
    output: torch.Tensor = ALL_ATTENTION_FUNCTIONS["sdpa"](
        module, query, key, value, mask, dropout=0.0, scaling=scaling
    )[0]
    return output


def one_query(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    groups: int,
    scaling: float | None,
    own: bool = False,
) -> torch.Tensor:
    """The sdpa attention of one query position on a CPU or CUDA device, without transformers' dispatch.

    ``groups``: query heads per key head; ``scaling``: ``None`` for torch's own; ``own``: our kernel where it takes
    the shapes (`native.one_query_attention`, for the attention blocks `native.use_own_attention` marked). Else
    grouped heads go to torch's grouped-query attention when nothing is masked, and on the CPU under a mask too; else
    (CUDA, masked) the query heads of a key head are laid out as that head's positions (one query each, under the
    same mask), as ``sdpa_attention_forward`` does. The lean decoder checks at start-up that the numbers are those of
    transformers' forward, which `per_query` sends here (`decoder.probe`).
    """
    batch, heads, _, dim = query.shape
    if own and native.attends(query, key, mask):
        return native.one_query_attention(query, key, value, mask, dim**-0.5 if scaling is None else scaling)
    options = {}
    if groups > 1:
        grouped = key.shape[-1] == value.shape[-1] <= GROUPED_SDPA_LARGEST_DIM
        if grouped and (mask is None or query.device.type == "cpu"):
            options["enable_gqa"] = True
        else:
            query = query.reshape(batch, heads // groups, groups, dim)
            if mask is not None and mask.shape[1] == heads:  # a mask of each query head's: laid out as the queries
                mask = mask.reshape(mask.shape[0], heads // groups, groups, mask.shape[-1])
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scaling, **options
    )
    return output.reshape(batch, heads, 1, dim).transpose(1, 2)


def install() -> None:
    """Route transformers' ``sdpa`` attention through `per_query` (see there).

    Outside `one_query_at_a_time` that is sdpa itself, but for one query position on the CPU, which goes to
    `one_query` as the lean decoder's does.
    """
    AttentionInterface.register("sdpa", per_query)


def installed() -> bool:
    """Whether transformers' ``sdpa`` attention goes through `per_query` (see `install`)."""
    return ALL_ATTENTION_FUNCTIONS.get("sdpa") is per_query


__all__ = [
    "Attend",
    "each_query",
    "install",
    "installed",
    "one_position",
    "one_query",
    "one_query_at_a_time",
    "own_positions",
    "per_query",
    "whole_prompt",
]
