"""What users arriving from OpenAI, vLLM and llama.cpp expect: model naming, headers, nulls, peers' extras."""

from __future__ import annotations

import json
import uuid

import pytest
import structlog
from litestar.testing import TestClient

from entrypoints.http.__main__ import parse_settings
from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator, generation_params

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


# The peers' extras -----------------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def params_of(client: TestClient, fake: FakeGenerator, path: str = "/v1/chat/completions", **body: object) -> object:
    base = {"messages": USER} if path.endswith("chat/completions") else {"prompt": "Hi"}
    response = client.post(path, json=base | body)
    assert response.status_code == 200, response.text
    return fake.calls[-1][1]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"structured_outputs": {"choice": ["yes", "no"]}}, {"choices": ("yes", "no")}),
        ({"structured_outputs": {"regex": "[0-9]+"}}, {"regex": "[0-9]+"}),
        ({"structured_outputs": {"json": SCHEMA}}, {"json_schema": SCHEMA}),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, {"json_schema": SCHEMA}),
        ({"structured_outputs": {"grammar": 'root ::= "a"'}}, {"grammar": 'root ::= "a"'}),
        ({"guided_choice": ["yes", "no"]}, {"choices": ("yes", "no")}),
        ({"guided_regex": "[a-z]+"}, {"regex": "[a-z]+"}),
        ({"guided_json": SCHEMA}, {"json_schema": SCHEMA}),
        ({"guided_grammar": 'start: "a"'}, {"grammar": 'start: "a"'}),
        ({"grammar": 'root ::= "yes"'}, {"grammar": 'root ::= "yes"'}),
        ({"json_schema": SCHEMA}, {"json_schema": SCHEMA}),
    ],
)
def test_the_peers_structured_outputs_constrain_the_output(
    client: TestClient, fake: FakeGenerator, body: dict, expected: dict
) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        constraint = params_of(client, fake, path, **body).constraint  # type: ignore[attr-defined]
        assert constraint is not None
        for name, value in expected.items():
            assert getattr(constraint, name) == value


def test_two_output_constraints_at_once_are_a_400_naming_them(client: TestClient) -> None:
    body = {"messages": USER, "response_format": {"type": "json_object"}, "guided_regex": "a+"}
    error = error_of(client.post("/v1/chat/completions", json=body))
    assert "guided_regex" in error["message"]
    assert "response_format" in error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
        ({"guided_json": {"type": "nonsense"}}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"stop_token_ids": [100000]}, "stop_token_ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [5, 100000]}, "allowed_token_ids"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"n_predict": -2}, "n_predict"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_bad_peer_extras_are_400s_naming_the_field(client: TestClient, body: dict, param: str) -> None:
    error = error_of(client.post("/v1/chat/completions", json={"messages": USER} | body))
    assert error["param"] == param


def test_the_peers_sampling_extras_reach_the_generator(client: TestClient, fake: FakeGenerator) -> None:
    params = params_of(
        client, fake, min_tokens=3, ignore_eos=True, stop_token_ids=[7, 9], allowed_token_ids=[5, 6, 7], n_predict=12
    )
    assert params.options == {"min_new_tokens": 3, "ignore_eos": True}  # type: ignore[attr-defined]
    assert params.stop_token_ids == (7, 9)  # type: ignore[attr-defined]
    assert params.allowed_token_ids == (5, 6, 7)  # type: ignore[attr-defined]
    assert params.max_new_tokens == 12  # type: ignore[attr-defined]
    assert params.extra == {}  # type: ignore[attr-defined]


def test_n_predict_minus_one_means_no_limit_but_the_context(client: TestClient, fake: FakeGenerator) -> None:
    assert params_of(client, fake, n_predict=-1).max_new_tokens == fake.context_length - len(fake.calls[-1][0])  # type: ignore[attr-defined]
    assert params_of(client, fake, "/v1/completions", n_predict=-1).max_new_tokens == 16  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "Hello"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
    ],
)
def test_openai_output_options_not_offered_are_refused_by_name(client: TestClient, body: dict, param: str) -> None:
    error = error_of(client.post("/v1/chat/completions", json={"messages": USER} | body))
    assert error["param"] == param
    assert param in error["message"]


def test_text_modalities_alone_are_accepted(client: TestClient) -> None:
    assert client.post("/v1/chat/completions", json={"messages": USER, "modalities": ["text"]}).status_code == 200


def test_continue_final_message_continues_the_assistants_text(client: TestClient, fake: FakeGenerator) -> None:
    messages = [*USER, {"role": "assistant", "content": "The answer is"}]
    body = {"messages": messages, "continue_final_message": True, "add_generation_prompt": False}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    prompt = fake.decode(fake.calls[-1][0], skip_special_tokens=True)
    assert prompt.endswith("Assistant: The answer is")


def test_without_a_generation_prompt_the_prompt_ends_with_the_conversation(
    client: TestClient, fake: FakeGenerator
) -> None:
    assert (
        client.post("/v1/chat/completions", json={"messages": USER, "add_generation_prompt": False}).status_code == 200
    )
    assert not fake.decode(fake.calls[-1][0], skip_special_tokens=True).rstrip().endswith("Assistant:")


def test_continue_final_message_with_a_generation_prompt_is_a_400(client: TestClient) -> None:
    error = error_of(client.post("/v1/chat/completions", json={"messages": USER, "continue_final_message": True}))
    assert error["param"] == "continue_final_message"


def test_an_unknown_option_is_warned_about_once_by_name() -> None:
    from transformers import GenerationConfig  # noqa: PLC0415  the adapter's own test of its option table

    from adapters.huggingface.generator import build_generation_config  # noqa: PLC0415

    name = f"frobnicate_{uuid.uuid4().hex}"
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            build_generation_config(GenerationConfig(), generation_params(extra={name: 1}), vocab_size=10)
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [(entry["event"], entry["option"]) for entry in warnings] == [("request.unknown_option", name)]


# Tokenizing as chat counts ---------------------------------------------------------------------------------------


def test_tokenize_counts_messages_and_tools_exactly_as_chat_does(client: TestClient, fake: FakeGenerator) -> None:
    counted = client.post("/tokenize", json={"messages": USER, "tools": [WEATHER]}).json()
    answer = client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER]}).json()
    assert counted["count"] == answer["usage"]["prompt_tokens"]
    assert counted["tokens"] == list(fake.calls[-1][0])
    assert counted["count"] > client.post("/tokenize", json={"messages": USER}).json()["count"]


def test_tokenize_token_strs_are_the_tokenizers_own_strings(client: TestClient, fake: FakeGenerator) -> None:
    counted = client.post("/tokenize", json={"prompt": "Hi there é", "return_token_strs": True}).json()
    assert counted["token_strs"] == fake.token_strings(counted["tokens"])
    assert counted["token_strs"][2] == "\u0120"  # the tokenizer's string for a space, not the decoded " "


# Legacy functions ------------------------------------------------------------------------------------------------

GET_WEATHER = WEATHER["function"]


def test_legacy_functions_are_answered_with_a_function_call(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = weather_call("Paris")
    body = {"messages": USER, "functions": [GET_WEATHER]}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert choice["message"]["content"] is None
    assert "tool_calls" not in choice["message"]
    assert "get_weather" in fake.decode(fake.calls[-1][0], skip_special_tokens=True)


def test_a_legacy_function_call_is_streamed_as_delta_function_call(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = weather_call("Rome")
    raw = client.post("/v1/chat/completions", json={"messages": USER, "functions": [GET_WEATHER], "stream": True}).text
    chunks = [json.loads(b.removeprefix("data: ")) for b in raw.split("\n\n") if b.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert [d["function_call"] for d in deltas if "function_call" in d] == [
        {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    ]
    assert not any("tool_calls" in d for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"


def test_a_named_legacy_function_call_forces_that_function(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = weather_call("Oslo")
    body = {"messages": USER, "functions": [GET_WEATHER], "function_call": {"name": "get_weather"}}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    constraint = fake.calls[-1][1].constraint
    assert constraint is not None
    assert constraint.wrapper is not None
    assert not constraint.repeat


def test_a_legacy_conversation_carries_the_call_and_its_result_back(client: TestClient, fake: FakeGenerator) -> None:
    messages = [
        *USER,
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "X"}'}},
        {"role": "function", "name": "get_weather", "content": "sunny"},
    ]
    response = client.post("/v1/chat/completions", json={"messages": messages, "functions": [GET_WEATHER]})
    assert response.status_code == 200, response.text
    prompt = fake.decode(fake.calls[-1][0], skip_special_tokens=True)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "X"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny\n</tool_response>" in prompt


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"function_call": "auto"}, "function_call"),
        ({"functions": [GET_WEATHER], "tools": [WEATHER]}, "functions"),
        ({"functions": [{"name": "bad name!"}]}, "functions[0].name"),
    ],
)
def test_bad_legacy_function_requests_are_400s(client: TestClient, body: dict, param: str) -> None:
    error = error_of(client.post("/v1/chat/completions", json={"messages": USER} | body))
    assert error["param"] == param


# vLLM's logprob and usage extras ---------------------------------------------------------------------------------


def stream_events(client: TestClient, path: str, body: dict) -> list[dict]:
    raw = client.post(path, json=body | {"stream": True}).text
    return [json.loads(b.removeprefix("data: ")) for b in raw.split("\n\n") if b.startswith("data: {")]


def test_return_tokens_as_token_ids_names_logprob_tokens_by_id(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "ab"
    body = {"messages": USER, "logprobs": True, "top_logprobs": 2, "return_tokens_as_token_ids": True}
    content = client.post("/v1/chat/completions", json=body).json()["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content][:2] == [f"token_id:{ord('a') + 1}", f"token_id:{ord('b') + 1}"]
    assert all(entry["token"].startswith("token_id:") for entry in content)
    assert all(alt["token"].startswith("token_id:") for entry in content for alt in entry["top_logprobs"])
    legacy = client.post(
        "/v1/completions", json={"prompt": "x", "logprobs": 1, "return_tokens_as_token_ids": True}
    ).json()
    assert legacy["choices"][0]["logprobs"]["tokens"][0] == f"token_id:{ord('a') + 1}"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk(
    client: TestClient, fake: FakeGenerator, path: str
) -> None:
    fake.reply = "abc"
    base = {"messages": USER} if "chat" in path else {"prompt": "Hi"}
    options = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = stream_events(client, path, base | options)
    text_chunks = [
        c
        for c in chunks
        if c["choices"] and (c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content"))
    ]
    assert [c["usage"]["completion_tokens"] for c in text_chunks] == [1, 2, 3]
    prompt_tokens = chunks[-1]["usage"]["prompt_tokens"]
    assert all(c["usage"]["prompt_tokens"] == prompt_tokens for c in text_chunks)
    assert all(c["usage"]["total_tokens"] == prompt_tokens + c["usage"]["completion_tokens"] for c in text_chunks)
    plain = stream_events(client, path, base | {"stream_options": {"include_usage": True}})
    assert all(c["usage"] is None for c in plain if c["choices"])


def test_prompt_logprobs_score_every_prompt_token(client: TestClient, fake: FakeGenerator) -> None:
    answer = client.post("/v1/completions", json={"prompt": "abc", "prompt_logprobs": 2, "max_tokens": 2}).json()
    prompt_logprobs = answer["choices"][0]["prompt_logprobs"]
    assert fake.scored[-1] == tuple(fake.encode("abc", add_special_tokens=False))
    assert prompt_logprobs[0] is None
    assert len(prompt_logprobs) == 3
    for token, position in zip("bc", prompt_logprobs[1:], strict=True):
        chosen = position[str(ord(token) + 1)]
        assert chosen["decoded_token"] == token
        assert chosen["logprob"] <= 0
        assert 1 <= len(position) <= 3
    chat = client.post("/v1/chat/completions", json={"messages": USER, "prompt_logprobs": 0}).json()
    assert chat["prompt_logprobs"][0] is None
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    streamed = stream_events(client, "/v1/completions", {"prompt": "abc", "prompt_logprobs": 1, "max_tokens": 2})
    [ended] = [c["choices"][0] for c in streamed if c["choices"][0]["finish_reason"]]
    assert ended["prompt_logprobs"][0] is None
    assert len(ended["prompt_logprobs"]) == 3


def test_without_prompt_logprobs_the_field_is_left_out(client: TestClient, fake: FakeGenerator) -> None:
    assert "prompt_logprobs" not in client.post("/v1/completions", json={"prompt": "abc"}).json()["choices"][0]
    assert "prompt_logprobs" not in client.post("/v1/chat/completions", json={"messages": USER}).json()
    assert not fake.scored


def test_the_other_dialects_carry_their_own_ids_as_x_request_id(client: TestClient) -> None:
    message = client.post("/v1/messages", json={"model": "m", "max_tokens": 5, "messages": USER})
    assert message.headers["x-request-id"] == message.json()["id"]
    response = client.post("/v1/responses", json={"model": "m", "input": "Hi"})
    assert response.headers["x-request-id"] == response.json()["id"]
