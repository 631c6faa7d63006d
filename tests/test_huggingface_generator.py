"""HuggingFaceGenerator over a tiny random Llama: decoding options, streaming, cancellation, errors."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import attrs
import pytest
import structlog
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from adapters.huggingface.generator import GROUP_BEAM_SEARCH_REPO, HuggingFaceGenerator, build_generation_config
from adapters.stop_sequences import StopSequences
from application.generation import ChoiceJob, Prompt, TextGeneration, complete
from domain.errors import GenerationError, InvalidRequestError
from domain.generation import FinishReason, GeneratedTokens, GenerationParams
from tests.fakes import generation_params
from tests.tiny_model import EOS_TOKEN, build_tiny_model

PROMPT = "The cat eats an apple"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def load(model_dir, **model_kwargs) -> HuggingFaceGenerator:
    model = AutoModelForCausalLM.from_pretrained(model_dir, **model_kwargs)
    return HuggingFaceGenerator(model, AutoTokenizer.from_pretrained(model_dir), model_id="tiny")


@pytest.fixture(scope="module")
def generator(model_dir):
    generator = load(model_dir)
    yield generator
    generator.close()


@pytest.fixture
def own_generator(model_dir):
    """A generator whose model a test may hook into."""
    generator = load(model_dir)
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def prompt(generator):
    return generator.encode(PROMPT, add_special_tokens=True)


def collect(generator, prompt_ids, params) -> list[GeneratedTokens]:
    """The steps of one generation; how much of the prompt a prefix cache held is left out (it varies by run)."""

    async def run():
        return [attrs.evolve(step, cached_tokens=0) async for step in generator.generate(prompt_ids, params)]

    return asyncio.run(run())


def tokens_of(steps) -> list[int]:
    return [token for step in steps for token in step.token_ids]


def greedy(max_new_tokens=12, **options) -> GenerationParams:
    return generation_params(temperature=0, max_new_tokens=max_new_tokens, **options)


class ForwardCounter:
    """A forward hook that counts model calls (by prompt length) and can slow them down or fail them."""

    def __init__(self, delay: float = 0.0, error: Exception | None = None) -> None:
        self.delay = delay
        self.error = error
        self.lengths: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, module, args, kwargs, output):
        with self.lock:
            self.lengths.append(kwargs["input_ids"].shape[-1])
        if self.error is not None:
            raise self.error
        time.sleep(self.delay)

    @contextlib.contextmanager
    def attached(self, model):
        handle = model.register_forward_hook(self, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


# --- the tokenizer side and model facts ---------------------------------------------------------------------------


def test_exposes_model_facts_for_the_composition_root(generator):
    assert generator.model_id == "tiny"
    assert generator.context_length == 256
    assert generator.facts.eos_token == EOS_TOKEN
    assert generator.facts.bos_token == "<|begin_of_text|>"
    assert "<|im_start|>" in generator.facts.chat_template
    assert generator.facts.tokenizer.eos_token_id in generator.facts.eos_token_ids


def test_encode_and_decode_round_trip_unicode(generator):
    text = "Café 你好 😀 hello"
    ids = generator.encode(text, add_special_tokens=False)
    assert generator.decode(ids, skip_special_tokens=True) == text
    with_bos = generator.encode(text, add_special_tokens=True)
    assert with_bos[0] == generator.tokenizer.bos_token_id
    assert generator.decode(with_bos, skip_special_tokens=True) == text


# --- decoding ------------------------------------------------------------------------------------------------------


def test_greedy_is_deterministic_and_streams_one_token_per_step(generator, prompt):
    first = collect(generator, prompt, greedy())
    assert collect(generator, prompt, greedy()) == first
    assert all(len(step.token_ids) == 1 for step in first[:-1])
    assert first[-1] == GeneratedTokens(finish_reason=FinishReason.LENGTH)


def test_max_new_tokens_ends_with_length(generator, prompt):
    steps = collect(generator, prompt, greedy(max_new_tokens=5))
    assert len(tokens_of(steps)) == 5
    assert steps[-1].finish_reason is FinishReason.LENGTH


def test_an_eos_token_at_the_budget_ends_with_stop(generator, prompt):
    eos = generator.tokenizer.eos_token_id
    steps = collect(generator, prompt, greedy(max_new_tokens=4, extra={"forced_eos_token_id": eos}))
    assert tokens_of(steps)[-1] == eos  # EOS ids are yielded: the application decodes without special tokens
    assert steps[-1].finish_reason is FinishReason.STOP


def test_seed_makes_sampling_reproducible(generator, prompt):
    params = generation_params(max_new_tokens=16, seed=1234)
    first = tokens_of(collect(generator, prompt, params))
    assert tokens_of(collect(generator, prompt, params)) == first
    assert tokens_of(collect(generator, prompt, generation_params(max_new_tokens=16, seed=99))) != first


def test_seed_leaves_the_global_random_state_alone(generator, prompt):
    before = torch.get_rng_state()
    collect(generator, prompt, generation_params(max_new_tokens=8, seed=7))
    assert torch.equal(torch.get_rng_state(), before)


def test_a_stop_string_ends_generation_early(generator, prompt):
    """The use case's stop sequences stop the generator's stream: no token is generated past the one completing it."""
    baseline = tokens_of(collect(generator, prompt, greedy(max_new_tokens=20)))
    pieces = [generator.decode([token], skip_special_tokens=False) for token in baseline]
    index = next(
        i for i, piece in enumerate(pieces[1:], start=1) if piece.strip().isalpha() and piece not in "".join(pieces[:i])
    )
    generation = TextGeneration(generator, StopSequences())
    job = ChoiceJob(Prompt("", tuple(prompt)), greedy(max_new_tokens=20, stop=(pieces[index],)))
    completion = asyncio.run(complete(generation.run([job])))
    text = generator.decode(baseline[: index + 1], skip_special_tokens=True)
    assert completion.text == text[: text.index(pieces[index])]
    assert completion.choices[0].completion_tokens == index + 1
    assert completion.finish_reason is FinishReason.STOP
    assert completion.choices[0].stop_sequence == pieces[index]


def test_bad_words_are_never_generated(generator, prompt):
    baseline = tokens_of(collect(generator, prompt, greedy()))
    banned = tuple((token,) for token in set(baseline))
    tokens = tokens_of(collect(generator, prompt, greedy(bad_words_ids=banned)))
    assert not set(tokens) & set(baseline)


def test_no_repeat_ngram_size_reaches_generation(generator, prompt):
    tokens = tokens_of(collect(generator, prompt, greedy(max_new_tokens=30, no_repeat_ngram_size=1)))
    assert len(set(tokens)) == len(tokens)
    assert not set(tokens) & set(prompt)


def test_encoder_no_repeat_ngram_size_keeps_prompt_tokens_out(generator, prompt):
    tokens = tokens_of(collect(generator, prompt, greedy(max_new_tokens=30, encoder_no_repeat_ngram_size=1)))
    assert not set(tokens) & set(prompt)


def test_top_p_zero_keeps_only_the_likeliest_token(generator, prompt):
    """OpenAI accepts ``top_p: 0``: sampling then keeps the single likeliest token, so it decodes greedily."""
    baseline = tokens_of(collect(generator, prompt, greedy(max_new_tokens=10)))
    sampled = generation_params(max_new_tokens=10, temperature=1.5, top_p=0.0, seed=11)
    assert tokens_of(collect(generator, prompt, sampled)) == baseline


def test_repetition_penalty_changes_greedy_output(generator, prompt):
    baseline = tokens_of(collect(generator, prompt, greedy(max_new_tokens=30)))
    assert tokens_of(collect(generator, prompt, greedy(max_new_tokens=30, repetition_penalty=5.0))) != baseline


def test_min_new_tokens_holds_back_eos(generator, prompt):
    eos = generator.tokenizer.eos_token_id
    eager = {"sequence_bias": [[[eos], 100.0]]}  # makes EOS the greedy choice at every step
    assert tokens_of(collect(generator, prompt, greedy(extra=eager))) == [eos]
    steps = collect(generator, prompt, greedy(min_new_tokens=4, extra=eager))
    assert len(tokens_of(steps)) == 5
    assert tokens_of(steps)[4] == eos
    assert steps[-1].finish_reason is FinishReason.STOP


def test_guidance_scale_runs_and_steers(generator, prompt):
    baseline = tokens_of(collect(generator, prompt, greedy(max_new_tokens=16)))
    steps = collect(generator, prompt, greedy(max_new_tokens=16, guidance_scale=3.0))
    assert len(tokens_of(steps)) == 16
    assert tokens_of(steps) != baseline


def test_beam_search_yields_its_tokens_at_the_end(generator, prompt):
    params = generation_params(max_new_tokens=10, num_beams=3, length_penalty=0.5, early_stopping=True)
    steps = collect(generator, prompt, params)
    assert len(steps) == 2
    assert len(steps[0].token_ids) == 10
    assert steps[-1] == GeneratedTokens(finish_reason=FinishReason.LENGTH)
    assert collect(generator, prompt, params) == steps


def test_beam_search_honours_stop_strings(generator, prompt):
    baseline = tokens_of(collect(generator, prompt, generation_params(max_new_tokens=10, num_beams=3)))
    pieces = [generator.decode([token], skip_special_tokens=False) for token in baseline]
    steps = collect(generator, prompt, generation_params(max_new_tokens=10, num_beams=3, stop=(pieces[1],)))
    assert len(tokens_of(steps)) < 10
    assert steps[-1].finish_reason is FinishReason.STOP


def test_diverse_beam_search_runs_offline_and_is_deterministic(generator, prompt):
    params = generation_params(max_new_tokens=8, num_beams=4, num_beam_groups=2, diversity_penalty=2.0)
    steps = collect(generator, prompt, params)
    assert len(tokens_of(steps)) == 8
    assert steps[-1].finish_reason is FinishReason.LENGTH
    assert collect(generator, prompt, params) == steps


def test_diversity_penalty_makes_the_groups_differ(generator, prompt):
    def hypotheses(penalty):
        input_ids = torch.tensor([prompt])
        config = generator.generation_config(
            generation_params(max_new_tokens=6, num_beams=4, num_beam_groups=4, diversity_penalty=penalty),
            prompt_length=len(prompt),
        )
        config.num_return_sequences = 4
        output = generator.model.generate(
            input_ids, generation_config=config, custom_generate=str(GROUP_BEAM_SEARCH_REPO), trust_remote_code=True
        )
        return {tuple(row) for row in output[:, len(prompt) :].tolist()}

    assert len(hypotheses(0.0)) == 1  # without the penalty every group searches the same beams
    assert len(hypotheses(5.0)) == 4


def test_diverse_beam_search_takes_stop_strings(generator, prompt):
    params = generation_params(max_new_tokens=8, num_beams=4, num_beam_groups=2, diversity_penalty=1.0, stop=("e",))
    steps = collect(generator, prompt, params)
    assert 0 < len(tokens_of(steps)) <= 8


def test_bfloat16_model_generates(model_dir, prompt):
    generator = load(model_dir, dtype=torch.bfloat16)
    try:
        assert generator.model.dtype == torch.bfloat16
        steps = collect(generator, prompt, generation_params(max_new_tokens=6, seed=3))
        assert len(tokens_of(steps)) == 6
        once = collect(generator, prompt, greedy(max_new_tokens=6))
        assert collect(generator, prompt, greedy(max_new_tokens=6)) == once
    finally:
        generator.close()


def test_concurrent_requests_run_one_at_a_time_with_unchanged_results(generator, prompt):
    expected = tokens_of(collect(generator, prompt, greedy()))

    async def both():
        async def one():
            return [step async for step in generator.generate(prompt, greedy())]

        return await asyncio.gather(one(), one())

    assert [tokens_of(steps) for steps in asyncio.run(both())] == [expected, expected]


# --- cancellation and errors -----------------------------------------------------------------------------------------


def test_closing_the_stream_stops_the_worker_within_a_step(own_generator, prompt):
    counter = ForwardCounter(delay=0.02)

    async def first_token_then_close():
        steps = own_generator.generate(prompt, generation_params(max_new_tokens=200, seed=0))
        first = await anext(steps)
        started = time.monotonic()
        await steps.aclose()
        return first, time.monotonic() - started

    with counter.attached(own_generator.model):
        first, closing = asyncio.run(first_token_then_close())
    assert len(first.token_ids) == 1
    assert len(counter.lengths) <= 4  # prefill, the first step, at most one in flight when the event was set
    assert closing < 10  # a step is 0.02 s; generous for a busy machine, far below the 200 steps left
    # the worker is free again at once
    assert len(tokens_of(collect(own_generator, prompt, greedy(max_new_tokens=3)))) == 3


@pytest.mark.parametrize("groups", [1, 2])
def test_cancelling_a_beam_search_stops_the_worker(own_generator, prompt, groups):
    counter = ForwardCounter(delay=0.02)
    params = generation_params(max_new_tokens=200, num_beams=4, num_beam_groups=groups, diversity_penalty=1.0)

    async def cancel_while_searching():
        consumer = asyncio.create_task(anext(own_generator.generate(prompt, params)))
        deadline = time.monotonic() + 30
        while not counter.lengths:  # the search has begun (however busy the machine)
            assert time.monotonic() < deadline, "the beam search never started"
            await asyncio.sleep(0.01)
        steps_before = len(counter.lengths)
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer  # returns once the worker has let go
        return steps_before, len(counter.lengths)

    with counter.attached(own_generator.model):
        before, after = asyncio.run(cancel_while_searching())
    assert 0 < before < 20
    assert after - before <= 1
    assert len(tokens_of(collect(own_generator, prompt, greedy(max_new_tokens=3)))) == 3


def test_a_cancelled_request_waiting_in_the_queue_never_runs(own_generator, prompt):
    counter = ForwardCounter(delay=0.02)
    other_prompt = prompt + prompt  # a prefill of this length would mean the queued request ran

    async def scenario():
        running = own_generator.generate(prompt, greedy(max_new_tokens=200))
        await anext(running)
        queued = asyncio.create_task(anext(own_generator.generate(other_prompt, greedy(max_new_tokens=5))))
        await asyncio.sleep(0.05)
        queued.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await queued
        await running.aclose()

    with counter.attached(own_generator.model):
        asyncio.run(scenario())
        collect(own_generator, prompt, greedy(max_new_tokens=1))  # drain the worker
    assert len(other_prompt) not in counter.lengths


def test_a_failure_in_the_worker_surfaces_as_generation_error(own_generator, prompt):
    with (
        ForwardCounter(error=RuntimeError("device on fire")).attached(own_generator.model),
        pytest.raises(GenerationError, match="device on fire"),
    ):
        collect(own_generator, prompt, greedy())


# --- the GenerationConfig a request becomes -------------------------------------------------------------------------


def config_for(**options) -> GenerationConfig:
    return build_generation_config(GenerationConfig(), generation_params(**options), vocab_size=400, eos_token_ids=[3])


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"top_p": 0.9}, {"top_p": 0.9}),
        ({"top_k": 7}, {"top_k": 7}),
        ({"typical_p": 0.5}, {"typical_p": 0.5}),
        ({"min_p": 0.05}, {"min_p": 0.05}),
        ({"repetition_penalty": 1.3}, {"repetition_penalty": 1.3}),
        ({"no_repeat_ngram_size": 3}, {"no_repeat_ngram_size": 3}),
        ({"encoder_no_repeat_ngram_size": 2}, {"encoder_no_repeat_ngram_size": 2}),
        ({"num_beams": 4}, {"num_beams": 4, "do_sample": False}),
        (
            {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 0.5},
            {"num_beam_groups": 2, "diversity_penalty": 0.5},
        ),
        ({"num_beams": 2, "length_penalty": 0.7}, {"length_penalty": 0.7}),
        ({"num_beams": 2, "early_stopping": "never"}, {"early_stopping": "never"}),
        ({"min_length": 5}, {"min_length": 5}),
        ({"min_new_tokens": 4}, {"min_new_tokens": 4}),
        ({"guidance_scale": 1.5}, {"guidance_scale": 1.5}),
        ({"bad_words_ids": ((5,), (6, 7))}, {"bad_words_ids": [[5], [6, 7]]}),
        ({"max_new_tokens": 9}, {"max_new_tokens": 9}),
    ],
)
def test_every_option_reaches_the_generation_config(options, expected):
    config = config_for(**options)
    assert {name: getattr(config, name) for name in expected} == expected


@pytest.mark.parametrize(
    ("options", "do_sample", "temperature"),
    [
        ({"temperature": 0}, False, None),
        ({"temperature": 0.7}, True, 0.7),
        ({}, True, 1.0),
        ({"top_p": 0.5}, True, None),
        ({"num_beams": 3}, False, None),
        ({"temperature": 0.7, "do_sample": False}, False, 0.7),
    ],
)
def test_temperature_chooses_between_greedy_and_sampling(options, do_sample, temperature):
    config = config_for(**options)
    assert config.do_sample is do_sample
    assert config.temperature == temperature


def test_greedy_requests_may_carry_sampling_options():
    assert config_for(temperature=0, top_p=0.5, top_k=10).do_sample is False


def test_special_tokens_come_from_the_model():
    config = config_for()
    assert config.eos_token_id == [3]
    assert config.pad_token_id == 3


def test_model_defaults_are_the_starting_point(generator, prompt):
    generator.model.generation_config.top_k = 11
    try:
        config = generator.generation_config(generation_params(), prompt_length=len(prompt))
    finally:
        generator.model.generation_config.top_k = None
    assert config.top_k == 11
    assert config.max_new_tokens == generator.context_length - len(prompt)
    assert generator.model.generation_config.max_new_tokens is None  # the model's own config is left alone


def test_extra_options_known_to_generation_config_apply_and_others_are_ignored_and_logged():
    extra = {"epsilon_cutoff": 3e-4, "suppress_tokens": [5], "frobnicate": 1, "output_scores": True, "pad_token_id": 9}
    with structlog.testing.capture_logs() as logs:
        config = config_for(extra=extra)
    assert config.epsilon_cutoff == 3e-4
    assert config.suppress_tokens == [5]
    assert not config.output_scores
    assert config.pad_token_id == 3
    ignored = [entry for entry in logs if entry["event"] == "generation.ignored_options"]
    assert [entry["options"] for entry in ignored] == [["frobnicate", "output_scores", "pad_token_id"]]


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"top_k": -1}, "top_k"),
        ({"typical_p": 2.0}, "typical_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
        ({"encoder_no_repeat_ngram_size": -2}, "encoder_no_repeat_ngram_size"),
        ({"num_beams": 0}, "num_beams"),
        ({"num_beams": 3, "num_beam_groups": 2}, "num_beam_groups"),
        ({"num_beams": 4, "num_beam_groups": 2, "temperature": 0.8}, "num_beam_groups"),
        ({"diversity_penalty": -1.0}, "diversity_penalty"),
        ({"min_length": -1}, "min_length"),
        ({"min_new_tokens": -1}, "min_new_tokens"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"bad_words_ids": ((-1,),)}, "bad_words_ids"),
        ({"bad_words_ids": ((),)}, "bad_words_ids"),
        ({"num_beams": 2, "early_stopping": "sometimes"}, "early_stopping"),
        ({"temperature": 0.5, "length_penalty": 2.0}, "length_penalty"),
    ],
)
def test_invalid_options_are_rejected_naming_the_parameter(options, param):
    with pytest.raises(InvalidRequestError) as raised:
        config_for(**options)
    assert raised.value.param == param


def test_invalid_options_fail_before_anything_is_generated(generator, prompt):
    with pytest.raises(InvalidRequestError) as raised:
        collect(generator, prompt, generation_params(max_new_tokens=4, typical_p=2.0))
    assert raised.value.param == "typical_p"
