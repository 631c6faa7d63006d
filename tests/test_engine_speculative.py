"""Prompt-lookup speculation in the batching engine: fewer forward passes, the very same output."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
import torch
from litestar.testing import TestClient
from transformers import DynamicCache

from adapters.huggingface.engine import BatchingGenerator, BatchLimits, Speculation, attention
from adapters.huggingface.engine.attention import one_query_at_a_time
from adapters.huggingface.engine.loop import EngineLoop
from adapters.huggingface.engine.speculative import LONGEST_PAUSE, pause_after, propose
from adapters.huggingface.loading import load_model
from adapters.huggingface.quantization import kernel_works
from adapters.huggingface.transformers_compat import growing_cache
from domain.generation import FinishReason, GenerationParams
from entrypoints.bootstrap import build_services
from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.test_engine import MIXED, gather, plain
from tests.test_huggingface_generator import ForwardCounter, collect, greedy
from tests.tiny_model import build_tiny_model

DRAFT = 4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def speculating(model_dir, **limits) -> BatchingGenerator:
    return BatchingGenerator(plain(model_dir), BatchLimits(**limits), speculation=Speculation(DRAFT))


@pytest.fixture(scope="module")
def generator(model_dir):
    generator = speculating(model_dir)
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def reference(model_dir):
    """The plain generator over an identical model: one token per forward pass, no drafts."""
    generator = plain(model_dir)
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def prompts(generator):
    texts = (
        "The cat eats an apple. The cat eats an apple. The cat",
        "Hello",
        "My friend writes a long letter in the garden. My friend writes a long letter in the",
        "she",
        "def add(a, b):\n    return a + b\ndef add(a, b):\n",
    )
    return [generator.encode(text, add_special_tokens=True) for text in texts]


@pytest.fixture(scope="module")
def looping(generator):
    """A token, and greedy settings that make the model repeat it: every draft of it is accepted."""
    token = generator.encode(" apple", add_special_tokens=False)[-1]
    return token, {"logit_bias": {token: 100.0}}


def flat(steps):
    """Tokens, finish reason and logprobs of a stream, however its tokens were grouped into steps."""
    tokens = [token for step in steps for token in step.token_ids]
    logprobs = [(p.token_id, round(p.logprob, 4), [t for t, _ in p.top]) for step in steps for p in step.logprobs]
    return tokens, steps[-1].finish_reason, logprobs


def drafted(generator, run):
    """What ``run()`` returned, and the draft tokens (proposed, accepted) the engine counted meanwhile."""
    before = generator.drafts.totals()
    result = run()
    after = generator.drafts.totals()
    return result, (after[0] - before[0], after[1] - before[1])


# --- drafting ------------------------------------------------------------------------------------------------------


def test_a_draft_is_what_followed_the_latest_earlier_occurrence_of_the_tail():
    assert propose([1, 2, 3, 9, 1, 2, 3, 7, 8, 1, 2, 3], 3) == [7, 8, 1]


def test_the_longest_matching_tail_wins_over_a_later_shorter_match():
    # "2 3" occurs last at 6-7 (followed by 5), but "1 2 3" only at 0-2 (followed by 4)
    assert propose([1, 2, 3, 4, 0, 0, 2, 3, 5, 1, 2, 3], 2) == [4, 0]


def test_a_draft_stops_at_the_end_of_the_text_and_at_its_length():
    assert propose([5, 6, 7, 5, 6], 4) == [7, 5, 6]
    assert propose([1, 2, 3, 4, 5, 6, 1, 2], 2) == [3, 4]


def test_in_a_run_of_repeats_the_draft_is_as_long_as_the_text_allows():
    assert propose([7, 1, 1, 1, 1, 1], 3) == [1, 1]
    assert propose([7, *[1] * 9], 3) == [1, 1, 1]


def test_no_draft_without_an_earlier_occurrence_of_two_tokens_or_room():
    assert propose([1, 2, 3, 4], 3) == []
    assert propose([1, 2, 3, 1], 3) == []  # one token matching is too weak a guess
    assert propose([1, 2, 3, 1], 3, ngrams=(1,)) == [2, 3, 1]
    assert propose([], 3) == []
    assert propose([1, 2, 1], 0) == []


def test_a_big_batch_drafts_shorter_and_then_not_at_all():
    speculation = Speculation(tokens=4, positions=32)
    assert [speculation.draft_length(rows) for rows in (1, 4, 8, 16, 32)] == [4, 4, 3, 1, 0]
    assert Speculation(tokens=0).draft_length(1) == 0
    with pytest.raises(ValueError, match="speculative"):
        Speculation(tokens=-1)


def test_a_row_whose_drafts_keep_failing_drafts_ever_less_often():
    assert [pause_after(misses) for misses in range(8)] == [0, 2, 4, 8, 16, 32, 32, 32]
    assert LONGEST_PAUSE == 32
    tokens = [5, 6, 7, 8, 5, 6, 7, 9, 5, 6, 7]  # "5 6 7" seen before: a draft to propose
    row = SimpleNamespace(ids=torch.tensor([tokens]), room=10, draft_pause=2)
    assert [EngineLoop._draft(None, row, 4) for _ in range(3)] == [[], [], [9, 5, 6, 7]]  # type: ignore[arg-type]
    assert row.draft_pause == 0


# --- the output does not change ------------------------------------------------------------------------------------


def test_greedy_and_seeded_requests_decode_as_without_speculation(generator, reference, prompts, looping):
    token, bias = looping
    jobs = [
        *zip(prompts, MIXED, strict=True),
        (prompts[0], greedy(max_new_tokens=20, **bias)),
        (prompts[2], GenerationParams(max_new_tokens=16, seed=5, temperature=0.6, logprobs=2, **bias)),
    ]
    expected = [flat(collect(reference, prompt_ids, params)) for prompt_ids, params in jobs]
    results, (proposed, accepted) = drafted(generator, lambda: asyncio.run(gather(generator, jobs)))
    assert [flat(steps) for steps in results] == expected
    assert expected[-2][0] == [token] * 20
    assert accepted > 0
    assert proposed >= accepted


def test_each_request_alone_decodes_as_without_speculation(generator, reference, prompts):
    for prompt_ids, params in zip(prompts, MIXED, strict=True):
        assert flat(collect(generator, prompt_ids, params)) == flat(collect(reference, prompt_ids, params))


def test_accepted_drafts_save_forward_passes(generator, reference, prompts, looping):
    _, bias = looping
    params = greedy(max_new_tokens=24, **bias)
    counter = ForwardCounter()
    with counter.attached(generator.model):
        steps, (_, accepted) = drafted(generator, lambda: collect(generator, prompts[0], params))
    assert flat(steps) == flat(collect(reference, prompts[0], params))
    assert len(counter.lengths) == 24 - accepted  # the prefill gives the first token, each pass 1 + its accepted
    assert max(counter.lengths[1:]) == 1 + DRAFT
    assert any(len(step.token_ids) > 1 for step in steps)


def test_rows_with_and_without_drafts_share_a_step(generator, reference, prompts, looping):
    _, bias = looping
    jobs = [
        (prompts[0], greedy(max_new_tokens=30, **bias)),
        (prompts[2], greedy(max_new_tokens=30, **bias)),
        (prompts[1], greedy(max_new_tokens=30)),
        (prompts[3], GenerationParams(max_new_tokens=30, seed=9)),
    ]
    expected = [flat(collect(reference, prompt_ids, params)) for prompt_ids, params in jobs]
    counter = ForwardCounter()
    with counter.attached(generator.model):
        results = asyncio.run(gather(generator, jobs))
    assert [flat(steps) for steps in results] == expected
    assert max(counter.lengths) > 1 + DRAFT  # a prefill (a step feeds at most 1 + DRAFT positions)
    assert 1 + DRAFT in counter.lengths
    assert len(results[0]) < 30  # the drafting rows took several tokens a step
    assert len(results[2]) > len(results[0])


# --- endings inside a draft ----------------------------------------------------------------------------------------


def test_max_tokens_is_never_exceeded_by_a_draft(generator, reference, prompts, looping):
    _, bias = looping
    for max_new_tokens in (1, 2, 3, 6, 7):
        params = greedy(max_new_tokens=max_new_tokens, **bias)
        steps = collect(generator, prompts[0], params)
        assert flat(steps) == flat(collect(reference, prompts[0], params))
        assert len(flat(steps)[0]) == max_new_tokens
        assert steps[-1].finish_reason is FinishReason.LENGTH


def test_the_end_of_sequence_token_inside_an_accepted_draft_ends_the_request(generator, reference, prompts, looping):
    token, _ = looping
    eos = generator.tokenizer.eos_token_id
    # each token picked lowers the looping token's score by 2, so the model says it three times, then eos; after the
    # first one, "5 x" is looked up in the prompt, whose "x x eos" follows: the draft holds the whole rest
    prompt_ids = [*prompts[3], 5, token, token, token, eos, 5]
    params = greedy(max_new_tokens=10, logit_bias={token: 100.0, eos: 95.0}, frequency_penalty=2.0)
    steps, (_, accepted) = drafted(generator, lambda: collect(generator, prompt_ids, params))
    assert flat(steps) == flat(collect(reference, prompt_ids, params))
    assert flat(steps)[0] == [token, token, token, eos]
    assert steps[-1].finish_reason is FinishReason.STOP
    assert [len(step.token_ids) for step in steps if step.token_ids] == [1, 3]
    assert accepted == 3


# --- cancellation and counting -------------------------------------------------------------------------------------


def test_closing_a_drafting_stream_frees_its_row_and_leaves_the_others_untouched(
    model_dir, prompts, reference, looping
):
    _, bias = looping
    generator = speculating(model_dir)
    kept_params = greedy(max_new_tokens=30)
    expected = flat(collect(reference, prompts[1], kept_params))
    counter = ForwardCounter(delay=0.01)

    async def scenario():
        kept = asyncio.ensure_future(gather(generator, [(prompts[1], kept_params)]))
        dropped = generator.generate(prompts[0], greedy(max_new_tokens=200, **bias))
        await anext(dropped)
        await anext(dropped)
        await dropped.aclose()
        return (await kept)[0]

    try:
        with counter.attached(generator.model):
            assert flat(asyncio.run(scenario())) == expected
            at_end = len(counter.lengths)
            time.sleep(0.2)
        assert len(counter.lengths) == at_end  # nothing decodes once both have left
        assert generator.drafts.accepted > 0
    finally:
        generator.close()


def test_draft_counts_reach_the_metrics_endpoint(model_dir, looping):
    _, bias = looping
    generator = speculating(model_dir)
    settings = ServerSettings()
    app = create_app(
        settings,
        loader=lambda s: build_services(s, generator, close=generator.close, draft_tokens=generator.drafts.totals),
    )
    try:
        with TestClient(app) as client:
            deadline = time.monotonic() + 60
            while client.get("/health").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            before = client.get("/metrics").text
            response = client.post(
                "/v1/completions",
                json={"model": "tiny", "prompt": "The cat eats an apple. The cat", "max_tokens": 16, "temperature": 0}
                | bias,
            )
            assert response.status_code == 200, response.text
            after = client.get("/metrics").text
    finally:
        generator.close()
    assert "hf_openai_spec_decode_draft_tokens_total 0.0" in before
    assert "hf_openai_spec_decode_accepted_tokens_total 0.0" in before
    proposed, accepted = generator.drafts.totals()
    assert accepted > 0
    assert f"hf_openai_spec_decode_draft_tokens_total {float(proposed)}" in after
    assert f"hf_openai_spec_decode_accepted_tokens_total {float(accepted)}" in after


def test_through_the_api_a_stop_inside_a_draft_answers_as_without_speculation(model_dir, generator, reference, looping):
    token, bias = looping
    body = {
        "model": "tiny",
        "prompt": [*generator.encode("she", add_special_tokens=True), 5, token, token, token, 9, 5],
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": 2,
        "stop": [generator.decode([token] * 3, skip_special_tokens=True)],
    } | bias
    answers = {}
    before = generator.drafts.accepted
    for name, served in (("on", generator), ("off", reference)):
        with TestClient(create_app(ServerSettings(), generator=served)) as client:
            answers[name] = [client.post("/v1/completions", json=body | {"stream": stream}) for stream in (False, True)]
    assert generator.drafts.accepted > before
    (plain_on, stream_on), (plain_off, stream_off) = answers["on"], answers["off"]
    assert plain_on.status_code == plain_off.status_code == 200
    on, off = plain_on.json(), plain_off.json()
    assert on["choices"] == off["choices"]
    assert on["usage"] == off["usage"]
    assert on["choices"][0]["finish_reason"] == "stop"
    assert on["usage"]["completion_tokens"] == 3  # the draft's token after the stop is not counted
    chunks = [[line for line in r.text.splitlines() if line.startswith("data:")] for r in (stream_on, stream_off)]
    assert [_without_ids(chunk) for chunk in chunks[0]] == [_without_ids(chunk) for chunk in chunks[1]]


def _without_ids(line: str) -> str:
    """An SSE data line without what differs between two servers (ids, timestamps)."""
    if line == "data: [DONE]":
        return line
    event = json.loads(line.removeprefix("data: "))
    return json.dumps({key: value for key, value in event.items() if key not in {"id", "created"}}, sort_keys=True)


@pytest.mark.parametrize(
    "scheme",
    [
        "none",
        pytest.param("int8", marks=pytest.mark.skipif(not kernel_works("int8"), reason="no int8 CPU kernel")),
        pytest.param("int4", marks=pytest.mark.skipif(not kernel_works("int4"), reason="no int4 CPU kernel")),
    ],
)
def test_a_verifying_pass_gives_each_position_the_logits_of_a_one_token_step(tmp_path, scheme):
    """Bit for bit, prepacked float32, int8 or int4. Heads of 64 dimensions, as SmolLM2's: with those, one attention
    call over all the new positions rounds otherwise (and an int8 step can turn that into another token). SmolLM2's
    MLP width too: oneDNN multiplies one row of more than 1024 inputs otherwise than several (see `PackedLinear`)."""
    directory = build_tiny_model(tmp_path / "tiny", hidden_size=256, intermediate_size=1536)
    model = load_model(str(directory), device="cpu", quantize=scheme).model
    attention.install()
    prompt = torch.randint(3, 390, (1, 40), generator=torch.Generator().manual_seed(1))
    fed = [7, 300, 12, 250, 3]

    def prefilled() -> DynamicCache:
        cache = growing_cache(model.config)
        model(input_ids=prompt, cache=cache, use_cache=True)
        return cache

    with torch.inference_mode():
        cache = prefilled()
        steps = [model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True).logits[0, -1] for token in fed]
        cache = prefilled()
        with one_query_at_a_time():
            verified = model(input_ids=torch.tensor([fed]), cache=cache, use_cache=True).logits[0]
    for position, step in enumerate(steps):
        assert torch.equal(verified[position], step), position
