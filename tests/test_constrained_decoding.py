"""Grammar-constrained decoding on a tiny real model: ``response_format`` and forced tool calls always parse.

The model's weights are random, so without the grammar it writes gibberish; with it, every finished answer is JSON
that validates against the schema, and generation ends exactly when the JSON is complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
from litestar.testing import TestClient

from adapters.huggingface.constraints import GrammarCompiler
from domain.errors import InvalidRequestError
from domain.generation import OutputConstraint
from entrypoints.settings import ServerSettings
from tests.test_real_model import ready_client
from tests.tiny_model import build_tiny_model

USER = [{"role": "user", "content": "Describe a person as JSON."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "scores": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": 9},
            "minItems": 1,
            "maxItems": 3,
        },
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "colour", "scores", "admin"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


def person_format(schema: dict = PERSON) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-2k"), context_length=2048)


@pytest.fixture(scope="module")
def client(tiny_model: Path) -> Iterator[TestClient]:
    yield from ready_client(ServerSettings(model=str(tiny_model), device="cpu"))


def chat(client: TestClient, **body: object) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 400} | body)
    assert response.status_code == 200, response.text
    return response.json()


def events(client: TestClient, **body: object) -> list[dict]:
    raw = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 400, "stream": True} | body).text
    return [json.loads(b.removeprefix("data: ")) for b in raw.split("\n\n") if b.startswith("data: {")]


def test_without_a_format_the_random_model_writes_no_json(client: TestClient) -> None:
    text = chat(client, temperature=0, max_tokens=40)["choices"][0]["message"]["content"]
    with pytest.raises(ValueError, match=r"."):
        json.loads(text)


def test_json_object_mode_gives_a_json_object_and_then_stops(client: TestClient) -> None:
    finished = 0
    for options in ({"temperature": 0}, *({"seed": seed} for seed in range(4))):
        choice = chat(client, response_format={"type": "json_object"}, **options)["choices"][0]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)
            finished += 1
        else:
            assert choice["finish_reason"] == "length"
    assert finished >= 2


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_json_schema_output_validates_and_ends_with_the_json(client: TestClient, seed: int) -> None:
    body = chat(client, response_format=person_format(), seed=seed)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)
    assert body["usage"]["completion_tokens"] < 400


def test_greedy_beam_search_and_several_choices_all_validate(client: TestClient) -> None:
    texts = [chat(client, response_format=person_format(), temperature=0)["choices"][0]["message"]["content"]]
    texts += [
        chat(client, response_format=person_format(), num_beams=3, temperature=0)["choices"][0]["message"]["content"]
    ]
    texts += [c["message"]["content"] for c in chat(client, response_format=person_format(), n=3, seed=5)["choices"]]
    for text in texts:
        jsonschema.validate(json.loads(text), PERSON)


def test_streamed_json_equals_the_whole_answer(client: TestClient) -> None:
    whole = chat(client, response_format=person_format(), seed=11)["choices"][0]["message"]["content"]
    chunks = events(client, response_format=person_format(), seed=11)
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == whole
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_budget_that_ends_inside_the_json_finishes_with_length(client: TestClient) -> None:
    choice = chat(client, response_format=person_format(), seed=0, max_tokens=6)["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"].startswith('{"name')
    with pytest.raises(ValueError, match=r"."):
        json.loads(choice["message"]["content"])


def test_text_completions_honour_response_format_too(client: TestClient) -> None:
    response = client.post(
        "/v1/completions", json={"prompt": "Person:", "max_tokens": 400, "seed": 3, "response_format": person_format()}
    )
    assert response.status_code == 200, response.text
    jsonschema.validate(json.loads(response.json()["choices"][0]["text"]), PERSON)


def test_a_schema_no_output_can_satisfy_is_a_400_even_when_streaming(client: TestClient) -> None:
    impossible = {
        "type": "object",
        "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}},
        "required": ["a"],
    }
    for stream in (False, True):
        response = client.post(
            "/v1/chat/completions",
            json={"messages": USER, "response_format": person_format(impossible), "stream": stream},
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "response_format"
        assert "cannot be enforced" in error["message"]


def assert_valid_calls(calls: list[dict], names: set[str]) -> None:
    assert calls
    for tool_call in calls:
        assert tool_call["id"].startswith("call_")
        assert tool_call["function"]["name"] in names
        jsonschema.validate(json.loads(tool_call["function"]["arguments"]), PARAMETERS[tool_call["function"]["name"]])


@pytest.mark.parametrize("seed", [0, 1])
def test_required_tool_choice_always_yields_valid_calls(client: TestClient, seed: int) -> None:
    choice = chat(client, tools=TOOLS, tool_choice="required", seed=seed)["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    assert_valid_calls(choice["message"]["tool_calls"], {"get_weather", "add"})


def test_without_parallel_calls_the_answer_is_exactly_one_call(client: TestClient) -> None:
    for seed in range(3):
        choice = chat(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=seed)["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert len(choice["message"]["tool_calls"]) == 1
        assert_valid_calls(choice["message"]["tool_calls"], {"get_weather", "add"})


def test_a_named_tool_choice_calls_exactly_that_function(client: TestClient) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(2):
        choice = chat(client, tools=TOOLS, tool_choice=named, seed=seed)["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        [tool_call] = choice["message"]["tool_calls"]
        assert_valid_calls([tool_call], {"get_weather"})


def test_streamed_forced_calls_arrive_as_tool_call_deltas_without_markup(client: TestClient) -> None:
    named = {"type": "function", "function": {"name": "add"}}
    chunks = events(client, tools=TOOLS, tool_choice=named, seed=2)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == ""
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    assert [c["index"] for c in calls] == [0]
    assert_valid_calls(calls, {"add"})
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_the_grammar_compiler_caches_by_schema_and_rejects_unenforceable_ones(tiny_model: Path) -> None:
    from transformers import AutoTokenizer  # noqa: PLC0415  only this test needs the tokenizer alone

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    compiler = GrammarCompiler(tokenizer, len(tokenizer), (tokenizer.eos_token_id,))
    first = compiler.matcher(OutputConstraint(dict(PERSON)))
    second = compiler.matcher(OutputConstraint(dict(PERSON)))
    assert first is not second
    assert len(compiler._matchers) == 1
    with pytest.raises(InvalidRequestError) as error:
        compiler.check(OutputConstraint({"$ref": "#/nowhere"}, param="tools"))
    assert error.value.param == "tools"
