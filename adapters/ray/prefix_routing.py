"""Prefix affinity: send a prompt to the replica that most likely holds the keys and values of its first blocks.

A replica's prefix cache keeps prompt blocks of ``BLOCK_TOKENS`` tokens (``adapters.huggingface.prefix_cache``), so
a prompt that begins like one a replica served before is prefilled there from its first uncached block. The ingress
cannot see the replicas' caches; it remembers instead which replica it last sent each prefix to, keyed by a chained
hash of the prompt's blocks (block ``i``'s key covers blocks ``0..i``), as vLLM's and Ray Serve LLM's prefix-aware
routers do. A request goes to the replica holding its longest remembered prefix, unless that replica is busier than
the least loaded one by more than ``imbalance`` requests: then to the least loaded, which will hold the prefix next.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Hashable, Mapping, Sequence
from typing import Generic, TypeVar

import attrs

R = TypeVar("R", bound=Hashable)

BLOCK_TOKENS = 16
"""The engine's prefix-cache block size: only whole blocks are cached, so only they are hashed."""
MAX_BLOCKS = 256
"""Blocks of a prompt that are hashed (4096 tokens): longer prompts are told apart by their beginnings."""


def prefix_keys(
    token_ids: Sequence[int], *, block_tokens: int = BLOCK_TOKENS, max_blocks: int = MAX_BLOCKS
) -> tuple[int, ...]:
    """The chained hash of each whole block of ``token_ids`` but the last token (which is always computed).

    ``keys[i]`` identifies the prompt's first ``i + 1`` blocks, so two prompts share ``keys[:n]`` exactly when they
    share their first ``n`` blocks (up to hash collisions, which only cost a cache miss).
    """
    usable = min((len(token_ids) - 1) // block_tokens, max_blocks) if token_ids else 0
    keys: list[int] = []
    key = 0
    for block in range(usable):
        key = hash((key, *token_ids[block * block_tokens : (block + 1) * block_tokens]))
        keys.append(key)
    return tuple(keys)


@attrs.define
class PrefixAffinity(Generic[R]):
    """Which replica last took each prefix, and the choice of replica for a new request.

    ``capacity`` bounds the prefixes remembered (least recently used forgotten first); ``imbalance`` is how many
    more requests than the least loaded replica the prefix's replica may have and still get it.
    """

    imbalance: int = 4
    capacity: int = 200_000
    rng: random.Random = attrs.field(factory=random.Random)
    _owners: collections.OrderedDict[int, R] = attrs.field(init=False, factory=collections.OrderedDict)
    hits: int = attrs.field(init=False, default=0)
    """Requests sent to the replica that held (part of) their prefix."""
    misses: int = attrs.field(init=False, default=0)
    """Requests whose prefix no replica held (or whose replica was too busy)."""

    def choose(self, keys: Sequence[int], loads: Mapping[R, int]) -> R:
        """The replica for a request with prefix ``keys``, among ``loads`` (replica → requests it holds now)."""
        if not loads:
            msg = "no replica to choose from"
            raise ValueError(msg)
        least = min(loads.values())
        owner = self.owner(keys, loads)
        if owner is not None and loads[owner] <= least + self.imbalance:
            self.hits += 1
            return owner
        self.misses += 1
        return self.rng.choice([replica for replica, load in loads.items() if load == least])

    def owner(self, keys: Sequence[int], replicas: Mapping[R, int]) -> R | None:
        """The replica that took the longest of these prefixes and is still among ``replicas``, if any."""
        for key in reversed(keys):
            replica = self._owners.get(key)
            if replica is not None and replica in replicas:
                return replica
        return None

    def record(self, keys: Sequence[int], replica: R) -> None:
        """``replica`` took a request with prefix ``keys``: it holds these blocks now."""
        for key in keys:
            self._owners[key] = replica
            self._owners.move_to_end(key)
        while len(self._owners) > self.capacity:
            self._owners.popitem(last=False)

    def forget(self, replica: R) -> None:
        """``replica`` is gone: nothing it held is remembered."""
        for key in [key for key, owner in self._owners.items() if owner == replica]:
            del self._owners[key]
