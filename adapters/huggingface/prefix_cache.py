"""Automatic prefix caching: the keys and values of prompt blocks already seen, reused instead of prefilled again.

Requests to one server share beginnings: the chat template's system prompt, a long instruction, the history of a
conversation that grows by a turn each time, few-shot examples. Their keys and values depend only on the tokens
before them, so they are kept per block of ``block_tokens`` tokens in a tree (a block's parent is the block before
it) and a new prompt starts its prefill after the longest run of cached blocks it begins with; its last token is
always computed, since its logits pick the first new token. Least recently used blocks go first when the cache is
over its budget; a run of blocks is touched from its end, so a parent is always more recent than its children and
the oldest block is never one whose children are still cached. vLLM calls the same idea automatic prefix caching.

Keys and values also depend on the LoRA adapter a prompt runs with: each adapter (and the base model, ``None``)
has its own tree, so cached blocks never cross adapters.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import attrs
import structlog
import torch

log = structlog.get_logger(__name__)


@attrs.define(eq=False, repr=False)
class PrefixBlock:
    """One cached block: its tokens and their keys and values, ``[layers, 2, kv_heads, block_tokens, head_dim]``."""

    tokens: tuple[int, ...]
    kv: torch.Tensor
    parent: PrefixBlock | None
    children: dict[tuple[int, ...], PrefixBlock] = attrs.field(factory=dict)
    adapter: str | None = None
    """The LoRA adapter the keys and values were computed with (``None``: the base model)."""

    @property
    def nbytes(self) -> int:
        """Memory the block holds."""
        return self.kv.numel() * self.kv.element_size()


@attrs.define
class PrefixCache:
    """Blocks of prompt keys and values, looked up by the tokens they follow; at most ``budget_bytes`` of them."""

    budget_bytes: int
    block_tokens: int = 16
    _roots: dict[tuple[str | None, tuple[int, ...]], PrefixBlock] = attrs.field(init=False, factory=dict)
    """First blocks, by adapter and tokens."""
    _recent: collections.OrderedDict[PrefixBlock, None] = attrs.field(init=False, factory=collections.OrderedDict)
    """Every cached block, least recently used first."""
    held_bytes: int = attrs.field(init=False, default=0)
    looked_up_tokens: int = attrs.field(init=False, default=0)
    reused_tokens: int = attrs.field(init=False, default=0)

    def __attrs_post_init__(self) -> None:
        if self.budget_bytes < 0 or self.block_tokens < 1:
            msg = f"budget_bytes must be >= 0 and block_tokens >= 1, got {self}"
            raise ValueError(msg)

    @property
    def blocks(self) -> int:
        """How many blocks are cached."""
        return len(self._recent)

    def match(self, tokens: Sequence[int], *, adapter: str | None = None) -> list[PrefixBlock]:
        """The cached blocks ``tokens`` begins with, leaving at least its last token to compute; touches them."""
        blocks = self._walk(tokens, adapter)
        self._touch(blocks)
        self.looked_up_tokens += len(tokens)
        self.reused_tokens += len(blocks) * self.block_tokens
        return blocks

    def cached_tokens(self, tokens: Sequence[int], *, adapter: str | None = None) -> int:
        """How many of ``tokens`` `match` would reuse now (without touching anything)."""
        return len(self._walk(tokens, adapter)) * self.block_tokens

    def insert(
        self, tokens: Sequence[int], known: Sequence[PrefixBlock], kv: torch.Tensor, *, adapter: str | None = None
    ) -> None:
        """Cache the full blocks of ``tokens`` after the ``known`` ones, then evict down to the budget.

        ``kv`` holds the keys and values of every token of ``tokens``: ``[layers, 2, kv_heads, tokens, head_dim]``.
        """
        parent = known[-1] if known else None
        chain = list(known)
        for start in range(len(known) * self.block_tokens, len(tokens) - self.block_tokens + 1, self.block_tokens):
            key = tuple(tokens[start : start + self.block_tokens])
            block = self._roots.get((adapter, key)) if parent is None else parent.children.get(key)
            if block is None:
                block = PrefixBlock(
                    key, kv[:, :, :, start : start + self.block_tokens].clone(), parent, adapter=adapter
                )
                if block.nbytes > self.budget_bytes:
                    return
                if parent is None:
                    self._roots[adapter, key] = block
                else:
                    parent.children[key] = block
                self.held_bytes += block.nbytes
            chain.append(block)
            parent = block
        self._touch(chain)
        self._evict()

    def clear(self) -> None:
        """Forget every block."""
        self._roots.clear()
        self._recent.clear()
        self.held_bytes = 0

    def _walk(self, tokens: Sequence[int], adapter: str | None) -> list[PrefixBlock]:
        """The cached run of blocks ``tokens`` begins with; its last token is never in one (it stays to compute)."""
        blocks: list[PrefixBlock] = []
        for start in range(0, len(tokens) - self.block_tokens, self.block_tokens):
            key = tuple(tokens[start : start + self.block_tokens])
            block = self._roots.get((adapter, key)) if not blocks else blocks[-1].children.get(key)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _touch(self, chain: Sequence[PrefixBlock]) -> None:
        """Mark a run of blocks used, the last first, so that a block is always more recent than its children."""
        for block in reversed(chain):
            self._recent[block] = None
            self._recent.move_to_end(block)

    def _evict(self) -> None:
        while self.held_bytes > self.budget_bytes and self._recent:
            block, _ = self._recent.popitem(last=False)
            # a leaf: `_touch` keeps parents more recent than their children
            if block.parent is None:
                self._roots.pop((block.adapter, block.tokens), None)
            else:
                block.parent.children.pop(block.tokens, None)
            self.held_bytes -= block.nbytes


def prefix_kv(prefixes: Sequence[Sequence[PrefixBlock]], width: int) -> torch.Tensor:
    """The rows' cached prefixes side by side, each right-aligned in ``width`` columns behind zeros.

    The shape is ``[layers, 2, rows, kv_heads, width, head_dim]``.
    """
    first = next(blocks[0] for blocks in prefixes if blocks).kv
    layers, pair, heads, _, dim = first.shape
    out = first.new_zeros((layers, pair, len(prefixes), heads, width, dim))
    for row, blocks in enumerate(prefixes):
        if blocks:
            joined = torch.cat([block.kv for block in blocks], dim=3)
            out[:, :, row, :, width - joined.shape[3] :] = joined
    return out


__all__ = ["PrefixBlock", "PrefixCache", "prefix_kv"]
