"""OpenAI API breadth with the FakeGenerator: n, logprobs, echo scoring, prompt lists and ids, penalties, bias."""

from __future__ import annotations

import json

import pytest
from litestar.testing import TestClient

from tests.fakes import EOS, FakeGenerator, fake_logprob

USER = [{"role": "user", "content": "Hello"}]


def post(client: TestClient, path: str, **body: object) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def events(client: TestClient, path: str, **body: object) -> list[dict]:
    raw = client.post(path, json=body | {"stream": True}).text
    return [json.loads(b.removeprefix("data: ")) for b in raw.split("\n\n") if b.startswith("data: {")]


def test_n_choices_each_have_an_index_and_usage_sums_them(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "abc"
    body = post(client, "/v1/chat/completions", messages=USER, n=3)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in body["choices"]} == {"abc"}
    prompt_tokens = len(b"User: Hello\nAssistant:")
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 3 * 4,
        "total_tokens": prompt_tokens + 12,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def test_n_choices_get_distinct_seeds(client: TestClient, fake: FakeGenerator) -> None:
    post(client, "/v1/chat/completions", messages=USER, n=3, seed=10)
    assert sorted(params.seed for _, params in fake.calls[-3:]) == [10, 11, 12]


def test_streamed_n_choices_carry_their_index(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "xyz"
    chunks = events(client, "/v1/chat/completions", messages=USER, n=2, stream_options={"include_usage": True})
    for index in (0, 1):
        own = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == index]
        assert own[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content", "") for c in own) == "xyz"
        assert own[-1]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 8


def test_chat_logprobs_follow_openai(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "hi"
    body = post(client, "/v1/chat/completions", messages=USER, logprobs=True, top_logprobs=2)
    content = body["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == ["h", "i", "</s>"]
    for entry, token in zip(content, [ord("h") + 1, ord("i") + 1, EOS], strict=True):
        assert entry["logprob"] == fake_logprob(token, 2).logprob
        assert entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2
        assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"}


def test_chat_without_logprobs_has_null_logprobs(client: TestClient) -> None:
    assert post(client, "/v1/chat/completions", messages=USER)["choices"][0]["logprobs"] is None


def test_streamed_chat_logprobs_cover_every_token(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "héllo"
    chunks = events(client, "/v1/chat/completions", messages=USER, logprobs=True)
    tokens = [
        e
        for c in chunks
        if c["choices"] and c["choices"][0]["logprobs"]
        for e in c["choices"][0]["logprobs"]["content"]
    ]
    assert len(tokens) == len("héllo".encode()) + 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"12": 101}}, "logit_bias"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
    ],
)
def test_out_of_range_breadth_options_are_400s(client: TestClient, body: dict, param: str) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER} | body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_penalties_and_bias_reach_the_generator(client: TestClient, fake: FakeGenerator) -> None:
    post(
        client,
        "/v1/chat/completions",
        messages=USER,
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        logit_bias={"7": -100},
    )
    params = fake.calls[-1][1]
    assert (params.presence_penalty, params.frequency_penalty, dict(params.logit_bias)) == (0.5, -0.25, {7: -100})


def test_completion_logprobs_use_the_legacy_shape(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "ab"
    choice = post(client, "/v1/completions", prompt="x", logprobs=3, max_tokens=5)["choices"][0]
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["a", "b", "</s>"]
    assert logprobs["token_logprobs"] == [fake_logprob(t, 3).logprob for t in (ord("a") + 1, ord("b") + 1, EOS)]
    assert all(len(top) == 3 for top in logprobs["top_logprobs"])
    assert logprobs["text_offset"] == [0, 1, 2]


def test_echo_with_logprobs_and_no_new_tokens_scores_the_prompt(client: TestClient, fake: FakeGenerator) -> None:
    calls = len(fake.calls)
    body = post(client, "/v1/completions", prompt="abc", echo=True, logprobs=1, max_tokens=0)
    choice = body["choices"][0]
    assert choice["text"] == "abc"
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["a", "b", "c"]
    assert logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == [fake_logprob(ord(c) + 1, 1).logprob for c in "bc"]
    assert logprobs["text_offset"] == [0, 1, 2]
    assert len(fake.calls) == calls, "max_tokens 0 must not generate"
    assert body["usage"]["completion_tokens"] == 0


def test_lm_eval_loglikelihood_request_shape(client: TestClient, fake: FakeGenerator) -> None:
    """The exact payload lm-eval's local-completions backend sends for loglikelihood (token-id prompts)."""
    fake.reply = "z"
    context, continuation = [ord(c) + 1 for c in "The sky is"], [ord(c) + 1 for c in " blue"]
    payload = {
        "model": "m",
        "prompt": [context + continuation],
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }
    choice = post(client, "/v1/completions", **payload)["choices"][0]
    token_logprobs = choice["logprobs"]["token_logprobs"][len(context) : -1]
    assert token_logprobs == [fake_logprob(t, 1).logprob for t in continuation]
    tops = choice["logprobs"]["top_logprobs"][len(context) : -1]
    assert all(len(top) == 1 for top in tops)


def test_a_list_of_prompts_gives_one_choice_each_in_order(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "!"
    body = post(client, "/v1/completions", prompt=["one", "three"], echo=True, n=2)
    assert [c["text"] for c in body["choices"]] == ["one!", "one!", "three!", "three!"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == len("one") + len("three")


@pytest.mark.parametrize("prompt", [[105, 106], [[105, 106]]])
def test_token_id_prompts_are_accepted(client: TestClient, fake: FakeGenerator, prompt) -> None:
    post(client, "/v1/completions", prompt=prompt)
    assert fake.calls[-1][0] == (105, 106)


@pytest.mark.parametrize("prompt", [[], [[]], [1, "a"], [-1], [999999], [[1], 2]])
def test_bad_prompts_are_400s(client: TestClient, prompt) -> None:
    response = client.post("/v1/completions", json={"prompt": prompt})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"


def test_an_echoed_prompt_is_scored_once_for_all_its_choices(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "!"
    body = post(client, "/v1/completions", prompt=["ab", "cd"], echo=True, logprobs=1, n=3, max_tokens=2)
    assert [c["text"] for c in body["choices"]] == ["ab!"] * 3 + ["cd!"] * 3
    assert all(c["logprobs"]["token_logprobs"][0] is None for c in body["choices"])
    assert sorted(fake.scored) == [(ord("a") + 1, ord("b") + 1), (ord("c") + 1, ord("d") + 1)]
