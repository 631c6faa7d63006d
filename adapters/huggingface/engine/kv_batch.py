"""The running rows' keys and values, in one left-padded cache that rows join and leave between steps."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from transformers import DynamicCache

from adapters.huggingface.engine.rows import Row
from adapters.huggingface.transformers_compat import cache_layers, crop_cache, layer_kv


@attrs.define
class KVBatch:
    """The running rows with one left-padded KV cache: row ``i`` holds its ``cached`` tokens in the last columns."""

    rows: list[Row] = attrs.field(factory=list)
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None
    """``[rows, columns]``: 1 where the cache holds a real token, 0 on left padding and rejected draft tokens."""

    HOLES = 64
    """Masked columns between real ones (rejected draft tokens) past which `compact` closes them up."""

    def add(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Merge prefilled ``rows`` (their cache and mask) in, padding on the left whichever side is shorter."""
        if self.cache is None or self.mask is None or not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(cache_layers(self.cache), cache_layers(cache), strict=True):
            (my_keys, my_values), (their_keys, their_values) = layer_kv(mine), layer_kv(theirs)
            mine.keys = torch.cat([pad_left(my_keys, width, dim=2), pad_left(their_keys, width, dim=2)])
            mine.values = torch.cat([pad_left(my_values, width, dim=2), pad_left(their_values, width, dim=2)])
        self.mask = torch.cat([pad_left(self.mask, width, dim=1), pad_left(mask, width, dim=1)])
        self.rows.extend(rows)

    def keep(self, keep: Sequence[int]) -> None:
        """Keep only the rows at ``keep``, then drop the columns no remaining row uses."""
        if len(keep) == len(self.rows):
            return
        if not keep or self.cache is None or self.mask is None:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        first = int(self.mask.any(dim=0).int().argmax())
        self.mask = self.mask[:, first:]
        for layer in cache_layers(self.cache):
            keys, values = layer_kv(layer)
            layer.keys = keys.index_select(0, index)[:, :, first:]
            layer.values = values.index_select(0, index)[:, :, first:]
        self.rows = [self.rows[i] for i in keep]

    def step_mask(self, fed: int = 1) -> torch.Tensor:
        """The attention mask of a decoding step: the cached columns and the ``fed`` positions being fed."""
        if self.mask is None:
            msg = "an empty batch has no decoding step"
            raise RuntimeError(msg)
        return torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], fed))], dim=1)

    def grow(self, kept: Sequence[int] | None = None, fed: int = 1) -> None:
        """Account for the step just run, which appended ``fed`` columns of every row to the cache.

        ``kept``: of those, how many each row keeps (the last token and its accepted draft); all, by default. The
        columns no row keeps are cut off the cache; the others a row rejected are masked, left as holes that
        `compact` closes once they take more than ``HOLES`` columns.
        """
        if self.mask is None or self.cache is None:
            return
        rows = self.mask.shape[0]
        if kept is None or fed == 1:
            self.mask = torch.cat([self.mask, self.mask.new_ones((rows, fed))], dim=1)
            return
        longest = max(kept)
        counts = torch.tensor(kept, dtype=self.mask.dtype, device=self.mask.device)
        columns = torch.arange(longest, dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, (columns < counts[:, None]).to(self.mask.dtype)], dim=1)
        crop_cache(self.cache, self.mask.shape[1])
        self.compact()

    def compact(self) -> None:
        """Move each row's real columns together on the right once the masked holes between them grow too wide."""
        if self.mask is None or self.cache is None:
            return
        longest = int(self.mask.sum(dim=1).max())
        if self.mask.shape[1] - longest <= self.HOLES:
            return
        order = torch.sort(self.mask, dim=1, stable=True).indices[:, -longest:]  # holes first, real columns in order
        self.mask = self.mask.gather(1, order)
        for layer in cache_layers(self.cache):
            keys, values = layer_kv(layer)
            index = order[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[3])
            layer.keys, layer.values = keys.gather(2, index), values.gather(2, index)


def pad_left(tensor: torch.Tensor, width: int, *, dim: int) -> torch.Tensor:
    """``tensor`` with zeros prepended along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


__all__ = ["KVBatch", "pad_left"]
