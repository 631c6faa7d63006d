"""The batching engine on the embedded SmolLM2: greedy output equals the plain generator's, token for token."""

from __future__ import annotations

import asyncio

import pytest

from adapters.huggingface.engine import BatchingGenerator, BatchLimits, Speculation
from adapters.huggingface.generator import HuggingFaceGenerator
from adapters.huggingface.loading import load_model
from tests.fakes import generation_params

pytestmark = pytest.mark.slow

QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, for a child who keeps asking why.",
    "List three fruits.",
)
GREEDY = generation_params(temperature=0, max_new_tokens=48)


@pytest.fixture(scope="module")
def generators():
    # float32: exact equality is the engine's promise there. The int8 default's per-token products are the same in
    # any batch, but the engine's attention rounds differently from generate's, and an 8-bit step magnifies that.
    loaded = load_model(None, device="cpu", quantize="none")
    plain = HuggingFaceGenerator(loaded.model, loaded.tokenizer, model_id=loaded.model_id)
    engine = BatchingGenerator(
        HuggingFaceGenerator(loaded.model, loaded.tokenizer, model_id=loaded.model_id), BatchLimits(max_batch_size=8)
    )
    yield plain, engine
    engine.close()
    plain.close()


@pytest.fixture(scope="module")
def prompts(generators):
    tokenizer = generators[0].tokenizer
    return [
        list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"])
        for q in QUESTIONS
    ]


async def tokens(generator, prompt_ids, params):
    return [token async for step in generator.generate(prompt_ids, params) for token in step.token_ids]


def test_greedy_through_the_engine_equals_the_plain_generator(generators, prompts):
    plain, engine = generators

    async def run():
        expected = [await tokens(plain, p, GREEDY) for p in prompts]
        alone = [await tokens(engine, p, GREEDY) for p in prompts]
        together = await asyncio.gather(*(tokens(engine, p, GREEDY) for p in prompts))
        return expected, alone, together

    expected, alone, together = asyncio.run(run())
    assert alone == expected
    assert together == expected


def test_seeded_sampling_through_the_engine_equals_the_plain_generator(generators, prompts):
    plain, engine = generators
    params = generation_params(temperature=0.8, top_p=0.95, seed=2024, max_new_tokens=32)

    async def run():
        expected = await tokens(plain, prompts[1], params)
        crowd = [tokens(engine, p, generation_params(max_new_tokens=32)) for p in prompts[2:]]
        together = await asyncio.gather(tokens(engine, prompts[1], params), *crowd)
        return expected, together[0]

    expected, together = asyncio.run(run())
    assert together == expected


def test_prompt_lookup_speculation_leaves_the_output_unchanged(generators):
    plain, _ = generators
    engine = BatchingGenerator(
        HuggingFaceGenerator(plain.model, plain.tokenizer, model_id=plain.model_id),
        BatchLimits(max_batch_size=8),
        speculation=Speculation(4),
    )
    passage = "The old lighthouse stood at the end of the rocky point, its white paint peeling in the salty wind."
    prompt = list(
        plain.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Repeat this sentence exactly:\n\n{passage}"}], add_generation_prompt=True
        )["input_ids"]
    )
    seeded = generation_params(temperature=0.8, top_p=0.95, seed=2024, max_new_tokens=32)

    async def run():
        expected = [await tokens(plain, prompt, GREEDY), await tokens(plain, prompt, seeded)]
        together = await asyncio.gather(tokens(engine, prompt, GREEDY), tokens(engine, prompt, seeded))
        return expected, together

    try:
        expected, together = asyncio.run(run())
    finally:
        engine.close()
    assert together == expected
    assert engine.drafts.accepted > 0
