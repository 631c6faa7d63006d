"""The HTTP API through the real app factory, with the FakeGenerator: shapes, parameters and bad input."""

from __future__ import annotations

import pytest
from litestar.testing import TestClient

from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator

USER = [{"role": "user", "content": "Hello"}]


def chat(client: TestClient, **body: object) -> dict:
    response = client.post("/v1/chat/completions", json={"model": "m", "messages": USER} | body)
    assert response.status_code == 200, response.text
    return response.json()


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_chat_completion_has_openai_shape(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "Hi there"
    body = chat(client)
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "fake-model"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hi there"}, "finish_reason": "stop", "logprobs": None}
    ]
    prompt_tokens = len(b"User: Hello\nAssistant:")
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len(b"Hi there") + 1,
        "total_tokens": prompt_tokens + len(b"Hi there") + 1,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def test_text_completion_has_openai_shape(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = " world"
    body = client.post("/v1/completions", json={"model": "m", "prompt": "Hello"}).json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": " world", "finish_reason": "stop", "logprobs": None}]
    assert body["usage"]["prompt_tokens"] == len(b"Hello")


def test_completions_default_to_sixteen_tokens_like_openai(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "x" * 40
    body = client.post("/v1/completions", json={"prompt": "Hello"}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 16


def test_max_tokens_gives_finish_reason_length(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "abcdefgh"
    body = chat(client, max_tokens=3)
    assert body["choices"][0]["message"]["content"] == "abc"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_max_completion_tokens_wins_over_max_tokens(client: TestClient, fake: FakeGenerator) -> None:
    chat(client, max_tokens=30, max_completion_tokens=4)
    assert fake.calls[-1][1].max_new_tokens == 4


def test_echo_puts_the_prompt_in_front(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = " there"
    body = client.post("/v1/completions", json={"prompt": "Hi", "echo": True}).json()
    assert body["choices"][0]["text"] == "Hi there"


@pytest.mark.parametrize("stop", ["STOP", ["STOP"], ["nope", "ST"]])
def test_stop_sequences_end_the_text_and_are_removed(client: TestClient, fake: FakeGenerator, stop) -> None:
    fake.reply = "one two STOP three"
    body = chat(client, stop=stop)
    assert body["choices"][0]["message"]["content"] == "one two "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert fake.produced < len(fake.reply)


def test_server_wide_stop_sequences_apply_to_every_request(fake: FakeGenerator) -> None:
    fake.reply = "alpha ## beta"
    with TestClient(create_app(ServerSettings(stop_sequences=("##",)), generator=fake)) as client:
        assert chat(client)["choices"][0]["message"]["content"] == "alpha "
        completion = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 50}).json()
        assert completion["choices"][0]["text"] == "alpha "


def test_every_hf_parameter_reaches_the_generator(client: TestClient, fake: FakeGenerator) -> None:
    hf = {
        "repetition_penalty": 1.2,
        "no_repeat_ngram_size": 3,
        "encoder_no_repeat_ngram_size": 2,
        "top_k": 40,
        "typical_p": 0.9,
        "num_beams": 4,
        "num_beam_groups": 2,
        "diversity_penalty": 0.5,
        "length_penalty": 1.5,
        "min_length": 5,
        "max_new_tokens": 12,
        "early_stopping": True,
        "seed": 123,
        "guidance_scale": 1.5,
        "bad_words_ids": [[5, 6], [7]],
        "min_p": 0.05,
        "min_new_tokens": 2,
    }
    chat(client, temperature=0.7, top_p=0.95, **hf)
    params = fake.calls[-1][1]
    own = {"max_new_tokens", "seed"}
    for name, value in hf.items():
        expected = tuple(tuple(ids) for ids in value) if name == "bad_words_ids" else value
        assert (getattr(params, name) if name in own else params.options[name]) == expected, name
    assert (params.temperature, params.top_p) == (0.7, 0.95)


def test_other_generation_config_options_travel_as_extra(client: TestClient, fake: FakeGenerator) -> None:
    chat(client, epsilon_cutoff=0.0003, do_sample=False, output_attentions=True, totally_unknown="x")
    params = fake.calls[-1][1]
    assert params.options["epsilon_cutoff"] == 0.0003
    assert params.options["do_sample"] is False
    assert params.extra == {"output_attentions": True, "totally_unknown": "x"}


def test_content_parts_are_joined(client: TestClient, fake: FakeGenerator) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    chat(client, messages=messages)
    prompt_ids = fake.calls[-1][0]
    assert fake.decode(prompt_ids, skip_special_tokens=True) == "User: ab\nAssistant:"


def test_any_model_name_is_accepted_and_models_lists_the_real_one(client: TestClient) -> None:
    assert chat(client, model="gpt-4o")["model"] == "fake-model"
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["fake-model"]
    assert models["data"][0]["object"] == "model"


def test_health_is_ok_once_serving(client: TestClient) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


BAD_CHAT_BODIES = [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": USER, "max_tokens": -1}, "max_tokens"),
    ({"messages": USER, "max_tokens": "10"}, "max_tokens"),
    ({"messages": USER, "max_tokens": 1.5}, "max_tokens"),
    ({"messages": USER, "temperature": 2.5}, "temperature"),
    ({"messages": USER, "temperature": -0.1}, "temperature"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "top_p": 1.5}, "top_p"),
    ({"messages": USER, "top_k": -3}, "top_k"),
    ({"messages": USER, "num_beams": 0}, "num_beams"),
    ({"messages": USER, "repetition_penalty": 0}, "repetition_penalty"),
    ({"messages": USER, "typical_p": 2}, "typical_p"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "stop": 5}, "stop"),
    ({"messages": USER, "stop": [1, 2]}, "stop"),
    ({"messages": USER, "bad_words_ids": [[]]}, "bad_words_ids"),
    ({"messages": USER, "bad_words_ids": "x"}, "bad_words_ids"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "seed": "x"}, "seed"),
]


@pytest.mark.parametrize(("body", "param"), BAD_CHAT_BODIES)
def test_bad_chat_input_is_a_400_naming_the_field(client: TestClient, body: dict, param: str) -> None:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    "raw",
    [b"{", b"", b"[1, 2]", b'"text"', b"null", b"\xff\xfe", b'{"messages": [{"role": "user", "content": "x"}'],
)
def test_malformed_json_is_a_400(client: TestClient, raw: bytes) -> None:
    response = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert error_of(response)["type"] == "invalid_request_error"


def test_bad_completion_input_is_a_400(client: TestClient) -> None:
    assert error_of(client.post("/v1/completions", json={}))["param"] == "prompt"
    assert error_of(client.post("/v1/completions", json={"prompt": 7}))["param"] == "prompt"


def test_prompt_longer_than_the_context_is_context_length_exceeded(fake: FakeGenerator) -> None:
    fake.context_length = 64
    with TestClient(create_app(ServerSettings(), generator=fake)) as client:
        response = client.post("/v1/completions", json={"prompt": "x" * 100})
        assert response.status_code == 400
        error = error_of(response)
        assert error["code"] == "context_length_exceeded"
        assert "64" in error["message"]
        assert "100" in error["message"]
        too_many = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 64})
        assert error_of(too_many)["code"] == "context_length_exceeded"
        assert error_of(too_many)["param"] == "max_tokens"


def test_unknown_route_and_wrong_method_get_openai_errors(client: TestClient) -> None:
    assert error_of(client.get("/v1/nothing"))["code"] == "not_found"
    assert client.get("/v1/chat/completions").status_code == 405


def test_a_generator_failure_is_a_500_with_an_openai_body_and_the_server_survives(
    client: TestClient, fake: FakeGenerator
) -> None:
    fake.fail_after = 2
    response = client.post("/v1/chat/completions", json={"messages": USER})
    assert response.status_code == 500
    assert error_of(response)["type"] == "server_error"
    fake.fail_after = None
    assert chat(client)["choices"][0]["finish_reason"] == "stop"


def test_chat_template_file_is_used(tmp_path, fake: FakeGenerator) -> None:
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}>>")
    with TestClient(create_app(ServerSettings(chat_template=template), generator=fake)) as client:
        chat(client)
    assert fake.decode(fake.calls[-1][0], skip_special_tokens=True) == "[user] Hello>>"
