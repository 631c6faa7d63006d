"""Prefilling newcomers: grouping prompts, laying out cached and computed columns, remembering new blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING

import structlog
import torch

from adapters.huggingface.prefix_cache import PrefixCache, prefix_kv
from adapters.huggingface.transformers_compat import cache_layers, growing_cache, layer_kv

if TYPE_CHECKING:
    from transformers import DynamicCache

    from adapters.huggingface.engine.forward import Forward
    from adapters.huggingface.engine.rows import Row

log = structlog.get_logger(__name__)


def groups(rows: list[Row], budget: int) -> list[list[Row]]:
    """Split rows (sorted by prompt length) into groups whose padded prompts fit ``budget`` tokens."""
    found: list[list[Row]] = []
    current: list[Row] = []
    for row in rows:
        if current and (len(current) + 1) * len(row.prompt_ids) > budget:
            found.append(current)
            current = []
        current.append(row)
    if current:
        found.append(current)
    return found


def prefill_group(forward: Forward, group: list[Row]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
    """One forward pass over left-padded prompts: the cache, its mask, and each row's last logits (float32).

    A row that reuses cached blocks has them copied into the cache first and computes only the rest of its
    prompt: its columns are ``[zeros | cached prefix | zeros | rest]``, the first ``width`` columns holding
    every row's prefix and the others every row's rest, both right-aligned; the mask hides the zeros.
    """
    prefix_width = max(row.reused_tokens for row in group)
    width = max(len(row.prompt_ids) - row.reused_tokens for row in group)
    device = forward.model.device
    ids = torch.zeros((len(group), width), dtype=torch.long, device=device)
    mask = torch.zeros((len(group), prefix_width + width), dtype=torch.long, device=device)
    for index, row in enumerate(group):
        reused = row.reused_tokens
        rest = len(row.prompt_ids) - reused
        ids[index, width - rest :] = row.ids[0, reused:]
        mask[index, prefix_width - reused : prefix_width] = 1
        mask[index, prefix_width + width - rest :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, prefix_width:]
    cache = growing_cache(forward.model.config)
    if prefix_width:
        cached = prefix_kv([row.reused for row in group], prefix_width).to(device)
        for layer, (keys, values) in zip(cache_layers(cache), cached, strict=True):
            layer.update(keys, values)
    return cache, mask, forward(ids, positions, mask, cache, [row.params.adapter for row in group])[:, -1]


def remember_prefixes(prefixes: PrefixCache, group: list[Row], cache: DynamicCache, mask: torch.Tensor) -> bool:
    """Cache the full prompt blocks the group's rows computed and ``prefixes`` does not hold yet.

    Caching is an optimisation: if it fails (a model whose layers' keys differ in shape, say), the cache is emptied
    and ``False`` returned, for the engine to turn it off; the requests go on.
    """
    try:
        layers = [layer_kv(layer) for layer in cache_layers(cache)]
        for index, row in enumerate(group):
            if len(row.prompt_ids) // prefixes.block_tokens <= len(row.reused):
                continue
            columns = mask[index].nonzero().squeeze(1)
            kv = torch.stack([torch.stack([keys[index], values[index]]) for keys, values in layers])
            prefixes.insert(row.prompt_ids, row.reused, kv.index_select(3, columns), adapter=row.params.adapter)
    except Exception as error:  # noqa: BLE001  never fail a request for a cache
        log.warning("prefix_cache.disabled", error=str(error))
        prefixes.clear()
        return False
    return True


__all__ = ["groups", "prefill_group", "remember_prefixes"]
