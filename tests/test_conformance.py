"""What users arriving from OpenAI, vLLM and llama.cpp expect: model naming, headers, nulls, peers' extras."""

from __future__ import annotations

import json

import pytest
from litestar.testing import TestClient

from entrypoints.http.__main__ import parse_settings
from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator

USER = [{"role": "user", "content": "Hi"}]


def error_of(response: object, status: int = 400) -> dict:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    return response.json()["error"]  # type: ignore[attr-defined]


# Models and names ------------------------------------------------------------------------------------------------


def test_a_model_is_retrieved_by_its_id(client: TestClient) -> None:
    response = client.get("/v1/models/fake-model")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "fake-model"
    assert response.json()["object"] == "model"


def test_retrieving_an_unknown_model_is_a_404_model_not_found(client: TestClient) -> None:
    error = error_of(client.get("/v1/models/gpt-4o"), 404)
    assert error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error"
    assert "gpt-4o" in error["message"]


def test_served_model_names_are_aliases_and_the_first_is_the_reported_id(fake: FakeGenerator) -> None:
    settings = ServerSettings(served_model_names=("my-model", "org/other"))
    with TestClient(create_app(settings, generator=fake)) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["my-model"]
        assert client.get("/v1/models/org/other").json()["id"] == "org/other"
        assert client.get("/v1/models/my-model").status_code == 200
        assert client.get("/v1/models/fake-model").status_code == 404
        answer = client.post("/v1/chat/completions", json={"model": "org/other", "messages": USER}).json()
        assert answer["model"] == "my-model"


def test_served_model_name_is_repeatable_and_takes_several_values() -> None:
    settings = parse_settings(["--served-model-name", "a", "b", "--served-model-name", "c", "--served-model-name", "a"])
    assert settings.served_model_names == ("a", "b", "c")
    assert parse_settings([]).served_model_names == ()


# Headers and documents -------------------------------------------------------------------------------------------


def test_a_completion_carries_its_id_as_x_request_id(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER})
    assert response.headers["x-request-id"] == response.json()["id"]
    streamed = client.post("/v1/completions", json={"prompt": "Hi", "stream": True})
    assert streamed.headers["x-request-id"].startswith("cmpl-")


def test_the_clients_own_request_id_is_echoed(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER}, headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


def test_every_other_response_carries_a_request_id_too(client: TestClient) -> None:
    for response in (
        client.get("/v1/models"),
        client.get("/health"),
        client.get("/nowhere"),
        client.post("/v1/chat/completions", json={"messages": []}),
    ):
        assert response.headers["x-request-id"]


def test_the_openapi_document_is_also_at_openapi_json(client: TestClient) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200, response.text
    assert response.json() == client.get("/docs/openapi.json").json()
    assert "/v1/models/{model}" in response.json()["paths"]


# Request validation ----------------------------------------------------------------------------------------------

NULLABLE = {
    "n": None,
    "stream": None,
    "stream_options": None,
    "logprobs": None,
    "top_logprobs": None,
    "stop": None,
    "seed": None,
    "temperature": None,
    "top_p": None,
    "max_tokens": None,
    "max_completion_tokens": None,
    "presence_penalty": None,
    "frequency_penalty": None,
    "logit_bias": None,
    "user": None,
    "response_format": None,
    "tools": None,
    "tool_choice": None,
    "parallel_tool_calls": None,
}


def test_an_explicit_null_for_a_nullable_chat_field_means_its_default(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER} | NULLABLE)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 1


def test_an_explicit_null_for_a_nullable_completion_field_means_its_default(client: TestClient) -> None:
    body = {"prompt": "Hi", "n": None, "stream": None, "echo": None, "logprobs": None, "stop": None, "suffix": None}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"]


def test_a_null_inside_stream_options_means_its_default(client: TestClient) -> None:
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": None}}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 10**400])
def test_a_seed_beyond_signed_64_bits_is_a_400(client: TestClient, seed: int) -> None:
    error = error_of(client.post("/v1/chat/completions", json={"messages": USER, "seed": seed}))
    assert error["param"] == "seed"


def test_the_largest_seed_with_several_choices_gives_each_choice_a_valid_seed(
    client: TestClient, fake: FakeGenerator
) -> None:
    body = {"messages": USER, "seed": 2**63 - 1, "n": 3}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    seeds = [params.seed for _, params in fake.calls]
    assert sorted(seeds) == sorted([2**63 - 1, -(2**63), -(2**63) + 1])


def test_a_logit_bias_error_names_every_bad_key(client: TestClient) -> None:
    body = {"messages": USER, "logit_bias": {"abc": 1, "12": 101, "x9": 2, "13": -300}}
    error = error_of(client.post("/v1/chat/completions", json=body))
    assert error["param"] == "logit_bias"
    for key in ("abc", "x9", "12", "13"):
        assert key in error["message"]


def test_logit_bias_ids_outside_the_vocabulary_are_all_named(client: TestClient) -> None:
    outside = [str(1000 + i) for i in range(12)]
    error = error_of(
        client.post("/v1/chat/completions", json={"messages": USER, "logit_bias": dict.fromkeys(outside, 1)})
    )
    for key in outside:
        assert key in error["message"]


@pytest.mark.parametrize("choice", ["auto", "none", "required", {"type": "function", "function": {"name": "f"}}])
def test_tool_choice_without_tools_is_a_400(client: TestClient, choice: object) -> None:
    error = error_of(client.post("/v1/chat/completions", json={"messages": USER, "tool_choice": choice}))
    assert error["param"] == "tool_choice"
    assert "tools" in error["message"]


# Numbers the peers' tests check ----------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 3])
def test_legacy_top_logprobs_hold_the_chosen_token_and_up_to_k_alternatives(client: TestClient, k: int) -> None:
    body = {"prompt": "Hi", "max_tokens": 4, "logprobs": k}
    logprobs = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    for token, top in zip(logprobs["tokens"], logprobs["top_logprobs"], strict=True):
        assert token in top
        assert 1 <= len(top) <= k + 1
    if k == 0:
        assert all(len(top) == 1 for top in logprobs["top_logprobs"])


# Agents and tools ------------------------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ANSWER_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "answer", "schema": {"type": "object", "properties": {"answer": {"type": "string"}}}},
}


def weather_call(city: str) -> str:
    return '<tool_call>\n{"name": "get_weather", "arguments": {"city": "' + city + '"}}\n</tool_call>'


@pytest.mark.parametrize("max_tokens", [1, 5, 20, len(weather_call("Paris")) + 3])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_cut_off_by_max_tokens_leaks_no_markup(
    client: TestClient, fake: FakeGenerator, max_tokens: int, choice: object
) -> None:
    fake.reply = weather_call("Paris") + "\n" + weather_call("Rome")
    body = {"messages": USER, "tools": [WEATHER], "tool_choice": choice, "max_tokens": max_tokens}
    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    assert not message["content"]
    raw = client.post("/v1/chat/completions", json=body | {"stream": True}).text
    chunks = [json.loads(b.removeprefix("data: ")) for b in raw.split("\n\n") if b.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == ""


def test_auto_tools_with_a_response_format_let_the_model_call_or_answer_in_the_schema(
    client: TestClient, fake: FakeGenerator
) -> None:
    fake.reply = weather_call("Paris")
    body = {"messages": USER, "tools": [WEATHER], "response_format": ANSWER_FORMAT}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    constraint = fake.calls[-1][1].constraint
    assert constraint is not None
    assert constraint.wrapper is not None
    assert constraint.alternative is not None
    assert constraint.alternative.json_schema == ANSWER_FORMAT["json_schema"]["schema"]
