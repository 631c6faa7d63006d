"""BatchingGenerator: the generator suite against it, then what batching adds (joining, leaving, limits)."""

from __future__ import annotations

import asyncio
import time

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    EosTokenCriteria,
    LogitsProcessorList,
    MaxLengthCriteria,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
)

from adapters.huggingface.engine import BatchingGenerator, BatchLimits
from adapters.huggingface.engine.rows import best
from adapters.huggingface.generator import HuggingFaceGenerator
from adapters.huggingface.prefix_cache import PrefixCache
from adapters.huggingface.processors import HoldEnd, LeanStopping, apply, lean
from adapters.huggingface.threads import ThreadTuner
from domain.errors import GenerationError, QueueFullError
from domain.generation import FinishReason
from tests.fakes import generation_params

# The whole HuggingFaceGenerator suite runs again here, with the fixtures below handing it the engine.
from tests.test_huggingface_generator import *  # noqa: F403
from tests.test_huggingface_generator import PROMPT, ForwardCounter, collect, greedy, tokens_of


def plain(model_dir) -> HuggingFaceGenerator:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return HuggingFaceGenerator(model, AutoTokenizer.from_pretrained(model_dir), model_id="tiny")


def engine(model_dir, *, prefix_cache: bool = True, **limits) -> BatchingGenerator:
    """The engine, with a prefix cache of small blocks so that the tests' short prompts share some."""
    prefixes = PrefixCache(2**26, block_tokens=2) if prefix_cache else None
    return BatchingGenerator(plain(model_dir), BatchLimits(**limits), prefixes=prefixes)


@pytest.fixture(scope="module")
def generator(model_dir):
    generator = engine(model_dir)
    yield generator
    generator.close()


@pytest.fixture
def own_generator(model_dir):
    """One sequence at a time, so that a second request really waits in the queue."""
    generator = engine(model_dir, max_batch_size=1)
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def reference(model_dir):
    """The plain generator over an identical model: what the engine must reproduce."""
    generator = plain(model_dir)
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def prompts(generator):
    texts = (PROMPT, "Hello", "My friend writes a long letter in the garden. The old man", "she", "Café 你好 😀")
    return [generator.encode(text, add_special_tokens=True) for text in texts]


def same_steps(actual, expected):
    """Same tokens and finish; log-probabilities equal up to float noise (a batch sums in another order)."""
    assert [(s.token_ids, s.finish_reason) for s in actual] == [(s.token_ids, s.finish_reason) for s in expected]
    for got, want in zip(actual, expected, strict=True):
        assert [(p.token_id, [t for t, _ in p.top]) for p in got.logprobs] == [
            (p.token_id, [t for t, _ in p.top]) for p in want.logprobs
        ]
        for p, q in zip(got.logprobs, want.logprobs, strict=True):
            assert p.logprob == pytest.approx(q.logprob, abs=1e-4)
            assert [v for _, v in p.top] == pytest.approx([v for _, v in q.top], abs=1e-4)
    return True


async def gather(generator, jobs, *, cached_tokens: bool = False):
    """Every job's steps; how much of each prompt the prefix cache held is left out unless asked for."""

    async def one(prompt_ids, params):
        steps = [step async for step in generator.generate(prompt_ids, params)]
        return steps if cached_tokens else [attrs.evolve(step, cached_tokens=0) for step in steps]

    return await asyncio.gather(*(one(prompt_ids, params) for prompt_ids, params in jobs))


MIXED = (
    greedy(max_new_tokens=20),
    generation_params(max_new_tokens=14, seed=7),
    generation_params(max_new_tokens=9, temperature=0.7, top_p=0.9, seed=3),
    greedy(max_new_tokens=16, presence_penalty=0.8, frequency_penalty=0.4, logit_bias={5: 4.0}, logprobs=3),
    greedy(max_new_tokens=12, repetition_penalty=1.5, no_repeat_ngram_size=2),
)
"""Requests with different decoding settings, to decode side by side."""


# --- what batching must not change ---------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [3, 7, 8, 9, 12])
def test_the_rows_lean_processors_give_the_scores_of_transformers_own(length):
    eos = torch.tensor([2, 5])
    processors = LogitsProcessorList(
        [MinLengthLogitsProcessor(8, eos), MinNewTokensLengthLogitsProcessor(3, 6, eos), TemperatureLogitsWarper(0.7)]
    )
    leaner = lean(processors)
    assert [type(p) for p in leaner] == [HoldEnd, HoldEnd, TemperatureLogitsWarper]
    ids, scores = torch.randint(0, 10, (1, length)), torch.randn(1, 10)
    assert torch.equal(apply(leaner, ids, scores), processors(ids, scores))
    # generate's own pair for min_new_tokens=5 after a 3-token prompt: min_length 8 and 5 new tokens, one is kept
    same = LogitsProcessorList([MinLengthLogitsProcessor(8, eos), MinNewTokensLengthLogitsProcessor(3, 5, eos)])
    assert len(lean(same)) == 1
    assert torch.equal(apply(lean(same), ids, scores), same(ids, scores))


class EndsOnSeven(StoppingCriteria):
    """A criterion of another kind (a stop string's, say): called as it is."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: object) -> torch.BoolTensor:
        return input_ids[:, -1] == 7  # type: ignore[return-value]


@given(
    st.lists(st.integers(0, 9), min_size=1, max_size=12),
    st.sets(st.integers(0, 9), min_size=1, max_size=3),
    st.integers(1, 14),
    st.booleans(),
)
def test_lean_stopping_says_what_transformers_criteria_say(tokens, eos, max_length, other):
    criteria = StoppingCriteriaList([MaxLengthCriteria(max_length), EosTokenCriteria(torch.tensor(sorted(eos)))])
    if other:
        criteria.append(EndsOnSeven())
    ids, scores = torch.tensor([tokens]), torch.randn(1, 10)
    assert LeanStopping(criteria)(ids, scores) is bool(criteria(ids, scores).any())


def test_each_request_alone_matches_the_plain_generator(generator, reference, prompts):
    for prompt_ids, params in zip(prompts, MIXED, strict=True):
        assert collect(generator, prompt_ids, params) == collect(reference, prompt_ids, params)


def test_concurrent_requests_with_their_own_settings_match_the_plain_generator(generator, reference, prompts):
    jobs = list(zip(prompts, MIXED, strict=True))
    expected = [collect(reference, prompt_ids, params) for prompt_ids, params in jobs]
    counter = ForwardCounter()
    with counter.attached(generator.model):
        results = asyncio.run(gather(generator, jobs))
    assert all(same_steps(got, want) for got, want in zip(results, expected, strict=True))
    assert len(counter.lengths) < sum(len(tokens_of(steps)) for steps in expected)  # they shared forward passes


def test_logprobs_match_the_plain_generator_inside_a_batch(generator, reference, prompts):
    params = generation_params(max_new_tokens=6, seed=11, logprobs=2)
    expected = collect(reference, prompts[0], params)
    results = asyncio.run(gather(generator, [(prompts[0], params), (prompts[2], greedy(max_new_tokens=10))]))
    assert same_steps(results[0], expected)
    assert all(len(step.logprobs) == 1 and len(step.logprobs[0].top) == 2 for step in expected[:-1])


def test_a_seeded_request_is_reproducible_whoever_else_is_in_the_batch(generator, prompts):
    params = generation_params(max_new_tokens=12, seed=42)
    alone = collect(generator, prompts[1], params)
    unseeded = generation_params(max_new_tokens=12)
    crowded = asyncio.run(gather(generator, [(prompts[0], unseeded), (prompts[1], params), (prompts[3], unseeded)]))
    assert crowded[1] == alone


def test_a_request_joins_a_running_batch_and_both_decode_as_alone(generator, reference, prompts):
    long_params, short_params = greedy(max_new_tokens=40), greedy(max_new_tokens=8, stop=("e",))
    expected_long = collect(reference, prompts[2], long_params)
    expected_short = collect(reference, prompts[0], short_params)
    counter = ForwardCounter(delay=0.01)

    async def staggered():
        long_run = asyncio.ensure_future(gather(generator, [(prompts[2], long_params)]))
        deadline = time.monotonic() + 30
        while len(counter.lengths) < 3:  # a few steps in, however busy the machine
            assert time.monotonic() < deadline, "the first request never started"
            await asyncio.sleep(0.01)
        short = await gather(generator, [(prompts[0], short_params)])
        return (await long_run)[0], short[0]

    with counter.attached(generator.model):
        long_steps, short_steps = asyncio.run(staggered())
    assert long_steps == expected_long
    assert short_steps == expected_short


def test_a_finished_request_leaves_without_waiting_for_the_others(generator, prompts):
    async def scenario():
        long_run = asyncio.ensure_future(gather(generator, [(prompts[0], greedy(max_new_tokens=200))]))
        short = await gather(generator, [(prompts[1], greedy(max_new_tokens=3))])
        finished_first = not long_run.done()
        await long_run
        return short[0], finished_first

    counter = ForwardCounter(delay=0.01)
    with counter.attached(generator.model):
        short, finished_first = asyncio.run(scenario())
    assert len(tokens_of(short)) == 3
    assert short[-1].finish_reason is FinishReason.LENGTH
    assert finished_first


def test_closing_one_stream_leaves_the_others_untouched(generator, reference, prompts):
    expected = collect(reference, prompts[2], greedy(max_new_tokens=30))

    async def scenario():
        kept = asyncio.ensure_future(gather(generator, [(prompts[2], greedy(max_new_tokens=30))]))
        dropped = generator.generate(prompts[0], greedy(max_new_tokens=200))
        await anext(dropped)
        await anext(dropped)
        await dropped.aclose()
        return (await kept)[0]

    assert asyncio.run(scenario()) == expected


def test_closing_a_stream_frees_its_row_at_the_next_step(model_dir, prompts):
    generator = engine(model_dir)
    counter = ForwardCounter(delay=0.02)

    async def scenario():
        steps = generator.generate(prompts[0], greedy(max_new_tokens=200))
        await anext(steps)
        await steps.aclose()
        return len(counter.lengths)

    try:
        with counter.attached(generator.model):
            at_close = asyncio.run(scenario())
            time.sleep(0.2)
        assert len(counter.lengths) == at_close  # the engine had let go when aclose returned
    finally:
        generator.close()


# --- requests that cannot share a batch ----------------------------------------------------------------------------


def test_beam_search_runs_beside_the_batch_without_blocking_it(generator, reference, prompts):
    beams = generation_params(max_new_tokens=60, num_beams=3)
    assert not generator.batchable(beams)
    counter = ForwardCounter(delay=0.01)

    async def scenario():
        finished: list[str] = []

        async def run(name, prompt_ids, params):
            steps = [attrs.evolve(step, cached_tokens=0) async for step in generator.generate(prompt_ids, params)]
            finished.append(name)
            return steps

        beam = asyncio.ensure_future(run("beams", prompts[0], beams))
        await asyncio.sleep(0.05)
        quick = await run("greedy", prompts[1], greedy(max_new_tokens=4))
        return quick, await beam, finished

    with counter.attached(generator.model):
        quick, beam_steps, finished = asyncio.run(scenario())
    assert finished == ["greedy", "beams"]
    assert quick == collect(reference, prompts[1], greedy(max_new_tokens=4))
    assert beam_steps == collect(reference, prompts[0], beams)


@pytest.mark.parametrize(
    "params",
    [
        generation_params(num_beams=2),
        generation_params(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
        generation_params(guidance_scale=2.0),
    ],
)
def test_what_cannot_share_a_batch_takes_the_plain_path(generator, params):
    assert not generator.batchable(params)


# --- limits --------------------------------------------------------------------------------------------------------


def test_past_the_queue_a_request_is_refused_and_nothing_is_dropped(model_dir, prompts):
    generator = engine(model_dir, max_batch_size=1, max_queue=1)

    async def scenario():
        running = generator.generate(prompts[0], greedy(max_new_tokens=30))
        await anext(running)
        waiting = asyncio.ensure_future(gather(generator, [(prompts[1], greedy(max_new_tokens=3))]))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFullError) as refused:
            await anext(generator.generate(prompts[2], greedy(max_new_tokens=3)))
        rest = [step async for step in running]
        return refused.value, rest, (await waiting)[0]

    try:
        with ForwardCounter(delay=0.01).attached(generator.model):
            refused, rest, waited = asyncio.run(scenario())
    finally:
        generator.close()
    assert refused.code == "queue_full"
    assert rest[-1].finish_reason is FinishReason.LENGTH
    assert len(tokens_of(waited)) == 3


def test_the_batch_never_exceeds_its_size(model_dir, prompts):
    generator = engine(model_dir, max_batch_size=2)
    batch_sizes: list[int] = []

    def record(module, args, kwargs):
        batch_sizes.append(kwargs["input_ids"].shape[0])

    handle = generator.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        results = asyncio.run(gather(generator, [(p, greedy(max_new_tokens=6)) for p in prompts]))
    finally:
        handle.remove()
        generator.close()
    assert all(len(tokens_of(steps)) == 6 for steps in results)
    assert max(batch_sizes) == 2


def test_a_burst_is_prefilled_a_few_prompts_at_a_time_and_the_first_stream_early(model_dir, prompts):
    generator = engine(model_dir, prefix_cache=False, max_batch_size=8, prefill_tokens=2 * len(prompts[0]))
    shapes: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        shapes.append(tuple(kwargs["input_ids"].shape))

    handle = generator.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        results = asyncio.run(gather(generator, [(prompts[0], greedy(max_new_tokens=4))] * 6))
    finally:
        handle.remove()
        generator.close()
    prefills = [rows for rows, length in shapes if length > 1]
    assert sum(prefills) == 6
    assert max(prefills) == 2  # requests may reach the engine one by one, but never more than the budget at once
    first_decode = next(i for i, (_, length) in enumerate(shapes) if length == 1)
    last_prefill = max(i for i, (_, length) in enumerate(shapes) if length > 1)
    assert first_decode < last_prefill  # the first rows streamed before the last were prefilled
    assert all(steps == results[0] for steps in results)


def test_a_forward_failure_fails_the_whole_batch_then_the_engine_recovers(own_generator, prompts):
    with ForwardCounter(error=RuntimeError("device on fire")).attached(own_generator.model):
        results = asyncio.run(_outcomes(own_generator, prompts[:2]))
    assert all(isinstance(result, GenerationError) for result in results)
    assert len(tokens_of(collect(own_generator, prompts[0], greedy(max_new_tokens=3)))) == 3


def test_closing_the_engine_fails_what_waits(model_dir, prompts):
    generator = engine(model_dir, max_batch_size=1)
    counter = ForwardCounter(delay=0.02)

    async def scenario():
        running = asyncio.ensure_future(_outcomes(generator, [prompts[0]], max_new_tokens=200))
        waiting = asyncio.ensure_future(_outcomes(generator, [prompts[1]], max_new_tokens=3))
        await asyncio.sleep(0.1)
        generator.close()
        return (await running)[0], (await waiting)[0]

    with counter.attached(generator.model):
        running, waiting = asyncio.run(scenario())
    assert isinstance(running, GenerationError)
    assert isinstance(waiting, GenerationError)


async def _outcomes(generator, prompt_list, max_new_tokens=5):
    async def one(prompt_ids):
        try:
            return [step async for step in generator.generate(prompt_ids, greedy(max_new_tokens=max_new_tokens))]
        except GenerationError as error:
            return error

    return await asyncio.gather(*(one(prompt_ids) for prompt_ids in prompt_list))


def test_limits_must_be_positive():
    for limits in ({"max_batch_size": 0}, {"max_queue": -1}, {"prefill_tokens": 0}):
        with pytest.raises(ValueError, match="max_batch_size"):
            BatchLimits(**limits)


def test_the_cache_appends_in_place_and_survives_rows_being_replaced():
    from adapters.huggingface.transformers_compat import GrowingLayer  # noqa: PLC0415  the engine's cache layer

    layer, keys, values = GrowingLayer(), torch.empty(2, 3, 0, 4), torch.empty(2, 3, 0, 4)
    for step, width in enumerate([5, *[1] * 70, 3]):  # past the slack, so the buffers grow on the way
        new_keys, new_values = torch.randn(2, 3, width, 4), torch.randn(2, 3, width, 4)
        keys, values = torch.cat([keys, new_keys], dim=2), torch.cat([values, new_values], dim=2)
        got_keys, got_values = layer.update(new_keys, new_values)
        assert torch.equal(got_keys, keys)
        assert torch.equal(got_values, values)
        assert layer.get_seq_length() == keys.shape[2]
        if step == 30:  # rows leave: the batch swaps in a narrower cache, which the next step appends to
            keys, values = keys[:1, :, 2:], values[:1, :, 2:]
            layer.keys, layer.values = keys.clone(), values.clone()
            new_keys, new_values = torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4)
            keys, values = torch.cat([keys, new_keys], dim=2), torch.cat([values, new_values], dim=2)
            assert torch.equal(layer.update(new_keys, new_values)[0], keys)
            keys, values = torch.cat([keys, keys]), torch.cat([values, values])
            layer.keys, layer.values = keys.clone(), values.clone()
        if step % 7 == 3:  # a one-op decoding step: room for a column, written by the caller
            grown_keys, grown_values = layer.grow(1)
            new_keys, new_values = torch.randn(keys.shape[0], 3, 1, 4), torch.randn(values.shape[0], 3, 1, 4)
            grown_keys[:, :, -1:], grown_values[:, :, -1:] = new_keys, new_values
            keys, values = torch.cat([keys, new_keys], dim=2), torch.cat([values, new_values], dim=2)
            assert torch.equal(layer.keys, keys)
            assert torch.equal(layer.values, values)
            assert layer.get_seq_length() == keys.shape[2]


def test_the_engine_tunes_its_own_threads_and_decodes_the_same(model_dir, reference, prompts):
    tuner = ThreadTuner((1, 2), explore_every=4)
    tuned = BatchingGenerator(plain(model_dir), BatchLimits(), threads=tuner)
    before = torch.get_num_threads()
    try:
        jobs = [(prompt, params) for prompt, params in zip(prompts, MIXED, strict=True)]
        actual, expected = asyncio.run(gather(tuned, jobs)), asyncio.run(gather(reference, jobs))
    finally:
        tuned.close()
    assert all(same_steps(got, want) for got, want in zip(actual, expected, strict=True))
    decode = (False, len(prompts).bit_length())  # the kind of a decoding step of all five rows
    assert tuner.best(decode) in (1, 2)
    assert len(tuner._kinds[decode].estimates) == 2  # both counts were timed
    assert torch.get_num_threads() == before  # the engine's setting stays on its own thread


# --- prefix caching --------------------------------------------------------------------------------------------------


def test_a_repeated_prompt_reuses_its_cached_blocks_and_decodes_the_same(model_dir, reference, prompts):
    generator = engine(model_dir)
    prefixes = generator.prefixes
    try:
        jobs = [(prompt, greedy(max_new_tokens=12, logprobs=2)) for prompt in prompts]
        first = asyncio.run(gather(generator, jobs, cached_tokens=True))
        assert prefixes.reused_tokens == 0
        assert prefixes.blocks > 0
        again = asyncio.run(gather(generator, jobs, cached_tokens=True))
        expected = asyncio.run(gather(reference, jobs))
    finally:
        generator.close()
    # every prompt but its last token (and the odd one out of a 2-token block) came from the cache the second time
    assert prefixes.reused_tokens == sum(2 * ((len(p) - 1) // 2) for p in prompts)
    assert [steps[0].cached_tokens for steps in first] == [0] * len(prompts)
    assert [steps[0].cached_tokens for steps in again] == [2 * ((len(p) - 1) // 2) for p in prompts]
    assert all(same_steps(got, want) for got, want in zip(first, expected, strict=True))
    assert all(same_steps(got, want) for got, want in zip(again, expected, strict=True))


def test_prompts_that_share_a_beginning_prefill_together_each_from_its_own_cached_part(model_dir, reference, prompts):
    generator = engine(model_dir)
    base = prompts[2]  # the longest
    asyncio.run(gather(generator, [(base[:5], greedy(max_new_tokens=1))]))  # caches blocks of its first 4 tokens
    jobs = [
        (base, greedy(max_new_tokens=10)),  # 4 cached, the rest computed
        (base[:7] + prompts[0], greedy(max_new_tokens=10)),
        (prompts[1], greedy(max_new_tokens=10)),  # nothing cached: the group mixes both layouts
        (base[:5], generation_params(max_new_tokens=10, seed=5)),
    ]
    try:
        actual = asyncio.run(gather(generator, jobs))
    finally:
        generator.close()
    assert generator.prefixes.reused_tokens >= 4 + 4 + 4
    assert all(same_steps(got, want) for got, want in zip(actual, asyncio.run(gather(reference, jobs)), strict=True))


def test_the_cache_stays_within_its_budget(model_dir, prompts):
    model = plain(model_dir)
    block = model.model.config.num_hidden_layers * 2 * model.model.config.num_key_value_heads * 2
    block *= model.model.config.head_dim * 4  # bytes of one 2-token block in float32
    generator = BatchingGenerator(model, prefixes=PrefixCache(3 * block, block_tokens=2))
    try:
        asyncio.run(gather(generator, [(prompt, greedy(max_new_tokens=2)) for prompt in prompts]))
    finally:
        generator.close()
    assert generator.prefixes.blocks == 3
    assert generator.prefixes.held_bytes == 3 * block


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from([0.0, -0.0, 1.5, -2.0, 7.0, float("inf"), float("-inf"), float("nan")]), min_size=1, max_size=9
    ),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_the_greedy_pick_is_torchs_argmax_ties_nans_and_infinities_included(values: list[float], dtype: torch.dtype):
    scores = torch.tensor([values, values[::-1]], dtype=dtype)
    picked = best(scores)
    assert picked.dtype == torch.long
    assert torch.equal(picked, torch.argmax(scores, dim=-1, keepdim=True))
