"""End to end: the official OpenAI SDK against a real server."""

from __future__ import annotations

import openai
import pytest

from tests.fakes import FakeGenerator


@pytest.fixture
def sdk(live_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0)


def test_chat_completion_with_extra_body_hf_parameters(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.reply = "Paris is the capital."
    answer = sdk.chat.completions.create(
        model="anything",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
        max_tokens=50,
        temperature=0.2,
        extra_body={"top_k": 5, "repetition_penalty": 1.1, "num_beams": 2, "seed": 7, "no_repeat_ngram_size": 3},
    )
    assert answer.choices[0].message.content == "Paris is the capital."
    assert answer.choices[0].finish_reason == "stop"
    assert answer.id.startswith("chatcmpl-")
    assert answer.usage is not None
    assert answer.usage.completion_tokens == len(b"Paris is the capital.") + 1
    _, params = fake.calls[-1]
    assert params.seed == 7
    assert params.options == {"top_k": 5, "repetition_penalty": 1.1, "num_beams": 2, "no_repeat_ngram_size": 3}
    assert params.max_new_tokens == 50
    assert params.temperature == 0.2


def test_streamed_chat_concatenates_to_the_answer(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.reply = "Bonjour, ça va? 🙂"
    stream = sdk.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Bonjour, ça va? 🙂"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_completion_with_stop_and_echo(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.reply = " one two three"
    result = sdk.completions.create(model="m", prompt="Count:", stop=[" three"], echo=True, max_tokens=20)
    assert result.choices[0].text == "Count: one two"
    assert result.choices[0].finish_reason == "stop"
    assert result.id.startswith("cmpl-")


def test_models_lists_the_served_model(sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == ["fake-model"]


def test_bad_request_raises_the_sdk_error_with_the_openai_body(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], temperature=5)
    assert caught.value.body["param"] == "temperature"  # type: ignore[index]
    assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]
