"""Tools and structured output through the official OpenAI SDK against a real server (fake and tiny real model)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pydantic
import pytest

from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator
from tests.live_server import serve, wait_ready
from tests.test_constrained_decoding import WEATHER
from tests.tiny_model import build_tiny_model

USER = [{"role": "user", "content": "What is the weather in Paris?"}]


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    age: int = pydantic.Field(ge=0, le=99)
    colour: str = pydantic.Field(json_schema_extra={"enum": ["red", "blue"]})


@pytest.fixture
def sdk(live_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tiny_sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    model = build_tiny_model(tmp_path_factory.mktemp("tiny-sdk"), context_length=2048)
    with serve(create_app(ServerSettings(model=str(model), device="cpu"))) as base:
        wait_ready(base)
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_the_sdk_parses_tool_calls(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    answer = sdk.chat.completions.create(model="m", messages=USER, tools=[WEATHER], tool_choice="required")
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [tool_call] = choice.message.tool_calls or []
    assert isinstance(tool_call, openai.types.chat.ChatCompletionMessageFunctionToolCall)
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_the_sdk_streams_tool_calls_and_sends_results_back(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.reply = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
    calls: dict[int, dict] = {}
    finish = None
    for chunk in sdk.chat.completions.create(model="m", messages=USER, tools=[WEATHER], stream=True):
        delta = chunk.choices[0].delta
        assert not delta.content
        for part in delta.tool_calls or []:
            calls[part.index] = {"id": part.id, "name": part.function.name, "arguments": part.function.arguments}
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    fake.reply = "Snowy in Oslo."
    follow_up = sdk.chat.completions.create(
        model="m",
        messages=[
            *USER,
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": calls[0]["id"],
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": calls[0]["arguments"]},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": "snow, -3 C"},
        ],
        tools=[WEATHER],
    )
    assert follow_up.choices[0].message.content == "Snowy in Oslo."


def test_an_unknown_named_function_is_a_400_through_the_sdk(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        sdk.chat.completions.create(
            model="m", messages=USER, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}
        )
    assert error.value.body["param"] == "tool_choice"  # type: ignore[index]


def test_required_tools_on_a_real_model_give_valid_calls(tiny_sdk: openai.OpenAI) -> None:
    answer = tiny_sdk.chat.completions.create(
        model="m", messages=USER, tools=[WEATHER], tool_choice="required", max_tokens=300, seed=1
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    for tool_call in choice.message.tool_calls or []:
        assert tool_call.function.name == "get_weather"
        jsonschema.validate(json.loads(tool_call.function.arguments), WEATHER["function"]["parameters"])
    assert choice.message.tool_calls


def test_json_schema_response_format_through_the_sdk(tiny_sdk: openai.OpenAI) -> None:
    schema = Person.model_json_schema() | {"additionalProperties": False}
    answer = tiny_sdk.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "A person, please."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}},
        max_tokens=300,
        seed=2,
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content or ""), schema)


def test_the_sdks_parse_helper_gets_a_pydantic_object(tiny_sdk: openai.OpenAI) -> None:
    answer = tiny_sdk.chat.completions.parse(
        model="m", messages=[{"role": "user", "content": "A person."}], response_format=Person, max_tokens=300, seed=4
    )
    person = answer.choices[0].message.parsed
    assert isinstance(person, Person)
    assert person.colour in {"red", "blue"}
