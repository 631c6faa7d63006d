"""Slow checks on the embedded SmolLM2-135M-Instruct: forced tool calls and JSON schemas on a real chat model."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import pytest
from litestar.testing import TestClient

from entrypoints.settings import ServerSettings
from tests.test_real_model import ready_client

pytestmark = pytest.mark.slow

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    yield from ready_client(ServerSettings(device="cpu"))


def chat(client: TestClient, **body: object) -> dict:
    response = client.post("/v1/chat/completions", json={"max_tokens": 80, "temperature": 0} | body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_a_named_function_is_called_with_the_city_from_the_question(client: TestClient) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    choice = chat(client, messages=QUESTION, tools=[WEATHER], tool_choice=named)
    assert choice["finish_reason"] == "tool_calls"
    [tool_call] = choice["message"]["tool_calls"]
    arguments = json.loads(tool_call["function"]["arguments"])
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    assert "Paris" in arguments["city"]


def test_the_answer_to_a_tool_result_is_text(client: TestClient) -> None:
    conversation = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees Celsius."},
    ]
    choice = chat(client, messages=conversation, tools=[WEATHER], tool_choice="none")
    assert choice["message"]["content"]


def test_a_json_schema_answer_validates(client: TestClient) -> None:
    schema = {
        "type": "object",
        "properties": {
            "capital": {"type": "string", "maxLength": 30},
            "continent": {"enum": ["Africa", "Asia", "Europe", "America", "Oceania"]},
        },
        "required": ["capital", "continent"],
        "additionalProperties": False,
    }
    choice = chat(
        client,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": schema, "strict": True}},
    )
    assert choice["finish_reason"] == "stop"
    answer = json.loads(choice["message"]["content"])
    jsonschema.validate(answer, schema)
    assert answer["continent"] == "Europe"
