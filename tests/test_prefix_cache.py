"""PrefixCache: blocks found by the tokens they follow, the last token always left to compute, LRU within a budget."""

from __future__ import annotations

import pytest
import torch

from adapters.huggingface.prefix_cache import PrefixCache, prefix_kv

LAYERS, HEADS, DIM = 2, 1, 3


def kv_of(tokens: list[int]) -> torch.Tensor:
    """Keys and values that encode their token ids, ``[layers, 2, heads, len, dim]``."""
    values = torch.tensor(tokens, dtype=torch.float32).view(1, 1, 1, -1, 1)
    return values.expand(LAYERS, 2, HEADS, len(tokens), DIM).clone()


def block_bytes(block_tokens: int) -> int:
    return LAYERS * 2 * HEADS * block_tokens * DIM * 4


def cache_with(*prompts: list[int], blocks: int = 100, block_tokens: int = 2) -> PrefixCache:
    cache = PrefixCache(blocks * block_bytes(block_tokens), block_tokens=block_tokens)
    for prompt in prompts:
        cache.insert(prompt, cache.match(prompt), kv_of(prompt))
    return cache


def test_only_full_blocks_are_cached_and_the_last_token_is_never_reused():
    cache = cache_with([1, 2, 3, 4, 5])
    assert cache.blocks == 2  # [1, 2] and [3, 4]; 5 is not a full block
    assert [b.tokens for b in cache.match([1, 2, 3, 4, 5])] == [(1, 2), (3, 4)]
    assert [b.tokens for b in cache.match([1, 2, 3, 4])] == [(1, 2)]  # token 4 must be computed for its logits
    assert cache.cached_tokens([1, 2, 3, 4, 9, 9]) == 4
    assert cache.match([2, 1, 3, 4]) == []


def test_a_block_is_found_only_after_the_same_blocks():
    cache = cache_with([1, 2, 3, 4, 5])
    assert cache.match([9, 9, 3, 4, 5]) == []  # same tokens, other prefix: other keys and values
    blocks = cache.match([1, 2, 3, 4, 7, 7, 7])
    assert torch.equal(prefix_kv([blocks], 4)[:, :, 0], kv_of([1, 2, 3, 4]))


def test_prompts_branch_and_share_their_common_blocks():
    cache = cache_with([1, 2, 3, 4, 0], [1, 2, 5, 6, 0])
    assert cache.blocks == 3
    assert cache.held_bytes == 3 * block_bytes(2)
    assert cache.cached_tokens([1, 2, 5, 6, 0]) == 4


def test_least_recently_used_leaves_go_first_and_their_parents_stay():
    cache = cache_with([1, 2, 3, 4, 0], [5, 6, 7, 8, 0], blocks=4)
    cache.match([1, 2, 3, 4, 0])  # the first prompt is used again
    cache.insert([9, 9, 0], cache.match([9, 9, 0]), kv_of([9, 9, 0]))  # one over: the other prompt's leaf goes
    assert cache.blocks == 4
    assert cache.cached_tokens([1, 2, 3, 4, 0]) == 4
    assert cache.cached_tokens([5, 6, 7, 8, 0]) == 2
    assert cache.held_bytes == 4 * block_bytes(2)


def test_nothing_is_kept_past_a_budget_too_small_for_one_block():
    cache = PrefixCache(block_bytes(2) - 1, block_tokens=2)
    cache.insert([1, 2, 3], [], kv_of([1, 2, 3]))
    assert (cache.blocks, cache.held_bytes) == (0, 0)


def test_prefixes_of_different_lengths_are_right_aligned_behind_zeros():
    cache = cache_with([1, 2, 3, 4, 0], [5, 6, 0])
    joined = prefix_kv([cache.match([1, 2, 3, 4, 0]), cache.match([5, 6, 0]), []], 4)
    assert joined.shape == (LAYERS, 2, 3, HEADS, 4, DIM)
    assert joined[0, 0, :, 0, :, 0].tolist() == [[1, 2, 3, 4], [0, 0, 5, 6], [0, 0, 0, 0]]


def test_counts_and_clear():
    cache = cache_with([1, 2, 3, 4, 0])
    cache.match([1, 2, 3, 4, 0])
    assert (cache.looked_up_tokens, cache.reused_tokens) == (10, 4)
    cache.clear()
    assert (cache.blocks, cache.held_bytes, cache.match([1, 2, 3, 4, 0])) == (0, 0, [])


def test_settings_are_checked():
    with pytest.raises(ValueError, match="block_tokens"):
        PrefixCache(1024, block_tokens=0)


def test_the_prefix_cache_and_packing_flags_reach_the_settings(capsys):
    from entrypoints.http.__main__ import parse_settings  # noqa: PLC0415

    assert (parse_settings([]).prefix_cache_mib, parse_settings([]).pack_weights) == (256, True)
    settings = parse_settings(["--prefix-cache-mib", "0", "--no-pack-weights"])
    assert (settings.prefix_cache_mib, settings.pack_weights) == (0, False)
    with pytest.raises(SystemExit):
        parse_settings(["--prefix-cache-mib", "-1"])
    assert "--prefix-cache-mib: must be at least 0" in capsys.readouterr().err


def test_blocks_never_cross_adapters() -> None:
    cache = PrefixCache(budget_bytes=10**6, block_tokens=2)
    prompt = [1, 2, 3, 4, 5]
    cache.insert(prompt, [], kv_of(prompt), adapter="pirate#0")
    assert cache.match(prompt) == []
    assert cache.match(prompt, adapter="poet#1") == []
    assert [b.tokens for b in cache.match(prompt, adapter="pirate#0")] == [(1, 2), (3, 4)]
    cache.insert(prompt, [], kv_of(prompt))
    assert cache.cached_tokens(prompt) == 4
    assert cache.blocks == 4


def test_an_adapters_blocks_are_evicted_like_any_others() -> None:
    cache = PrefixCache(budget_bytes=2 * block_bytes(2), block_tokens=2)
    prompt = [1, 2, 3, 4, 5]
    cache.insert(prompt, [], kv_of(prompt), adapter="pirate#0")
    cache.insert(prompt, [], kv_of(prompt))
    assert cache.blocks == 2
    assert cache.held_bytes == 2 * block_bytes(2)
    assert cache.match(prompt, adapter="pirate#0") == []
    assert len(cache.match(prompt)) == 2
