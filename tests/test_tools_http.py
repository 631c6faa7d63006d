"""Tools, tool calls and ``response_format`` over HTTP, with the FakeGenerator: shapes, streaming, prompts, 400s."""

from __future__ import annotations

import json

import pytest
from litestar.testing import TestClient

from domain.generation import OutputConstraint
from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator

USER = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def call(name: str, **arguments: object) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def chat(client: TestClient, **body: object) -> dict:
    response = client.post("/v1/chat/completions", json={"messages": USER} | body)
    assert response.status_code == 200, response.text
    return response.json()


def rejected(client: TestClient, path: str = "/v1/chat/completions", **body: object) -> dict:
    response = client.post(path, json={"messages": USER} | body)
    assert response.status_code == 400, response.text
    return response.json()["error"]


def chunks(client: TestClient, **body: object) -> list[dict]:
    raw = client.post("/v1/chat/completions", json={"messages": USER, "stream": True} | body).text
    return [json.loads(b.removeprefix("data: ")) for b in raw.split("\n\n") if b.startswith("data: {")]


def prompt_of(fake: FakeGenerator) -> str:
    prompt_ids, _ = fake.calls[-1]
    return fake.decode(prompt_ids, skip_special_tokens=True)


def test_an_answer_that_is_only_a_call_has_null_content_and_finishes_with_tool_calls(
    client: TestClient, fake: FakeGenerator
) -> None:
    fake.reply = call("get_weather", city="Paris")
    choice = chat(client, tools=[WEATHER])["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["role"] == "assistant"
    assert message["content"] is None
    [tool_call] = message["tool_calls"]
    assert tool_call["id"].startswith("call_")
    assert tool_call["type"] == "function"
    assert tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == {"city": "Paris"}


def test_text_before_the_calls_is_the_content(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = f"Checking both.\n{call('get_weather', city='Paris')}\n{call('get_time')}"
    message = chat(client, tools=[WEATHER, TIME])["choices"][0]["message"]
    assert message["content"] == "Checking both."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather", "get_time"]
    assert len({c["id"] for c in message["tool_calls"]}) == 2


def test_an_answer_without_calls_keeps_its_shape(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "It is sunny."
    choice = chat(client, tools=[WEATHER])["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "It is sunny."}
    assert choice["finish_reason"] == "stop"


def test_tool_choice_none_shows_no_tools_and_parses_no_calls(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = call("get_weather", city="Paris")
    choice = chat(client, tools=[WEATHER], tool_choice="none")["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": fake.reply}
    assert choice["finish_reason"] == "stop"
    assert "get_weather" not in prompt_of(fake)


def test_a_template_without_tool_support_gets_the_tools_in_the_system_prompt(
    client: TestClient, fake: FakeGenerator
) -> None:
    chat(client, messages=[{"role": "system", "content": "Be brief."}, *USER], tools=[WEATHER])
    prompt = prompt_of(fake)
    assert prompt.startswith("System: Be brief.\n\n# Tools\n")
    assert f"<tools>\n{json.dumps(WEATHER)}\n</tools>" in prompt
    assert "<tool_call></tool_call> XML tags" in prompt
    assert prompt.endswith("User: What is the weather in Paris?\nAssistant:")


def test_only_forced_tool_choices_constrain_generation(client: TestClient, fake: FakeGenerator) -> None:
    chat(client, tools=[WEATHER, TIME])
    assert fake.calls[-1][1].constraint is None
    chat(client, tools=[WEATHER, TIME], tool_choice="required")
    required = fake.calls[-1][1].constraint
    assert required is not None
    assert required.repeat
    assert required.param == "tools"
    chat(client, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    named = fake.calls[-1][1].constraint
    assert named is not None
    assert not named.repeat
    assert named.json_schema["properties"]["name"] == {"const": "get_time"}
    chat(client, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
    assert not fake.calls[-1][1].constraint.repeat


def test_streamed_calls_arrive_whole_in_openai_delta_shape(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = f"Sure.\n{call('get_weather', city='Paris')}\n{call('get_time')}"
    events = chunks(client, tools=[WEATHER, TIME])
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0]["role"] == "assistant"
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == "Sure."
    calls = [c for d in deltas for c in d.get("tool_calls", [])]
    assert [(c["index"], c["type"], c["function"]["name"]) for c in calls] == [
        (0, "function", "get_weather"),
        (1, "function", "get_time"),
    ]
    assert all(c["id"].startswith("call_") for c in calls)
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert all("tool_calls" not in d for d in deltas if d.get("content"))
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_call_cut_by_max_tokens_finishes_with_length(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = call("get_weather", city="Paris")
    choice = chat(client, tools=[WEATHER], max_tokens=20)["choices"][0]
    assert choice["finish_reason"] == "length"
    assert "tool_calls" not in choice["message"]


def test_calls_and_results_are_accepted_back_in_the_conversation(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "It is sunny in Paris."
    conversation = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]
    assert chat(client, messages=conversation, tools=[WEATHER])["choices"][0]["message"]["content"] == fake.reply
    prompt = prompt_of(fake)
    assert 'Assistant: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "User: <tool_response>\nsunny, 24 C\n</tool_response>\nAssistant:" in prompt


def test_a_tool_message_needs_its_call_id(client: TestClient) -> None:
    error = rejected(client, messages=[*USER, {"role": "tool", "content": "sunny"}])
    assert error["param"] == "messages[1].tool_call_id"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
            "tools[0].function.parameters",
        ),
    ],
)
def test_bad_tool_requests_are_400s(client: TestClient, body: dict, param: str) -> None:
    error = rejected(client, **body)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_bad_tool_requests_are_400s_before_a_stream_starts(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions",
        json={"messages": USER, "stream": True, "tool_choice": {"type": "function", "function": {"name": "x"}}},
    )
    assert response.status_code == 400


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_response_format_maps_to_an_output_constraint(client: TestClient, fake: FakeGenerator, path: str) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    base = {"messages": USER} if path.endswith("chat/completions") else {"prompt": "Hi"}
    formats = [
        ({"type": "text"}, None),
        ({"type": "json_object"}, OutputConstraint()),
        (
            {"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}},
            OutputConstraint(schema),
        ),
        ({"type": "json_schema", "json_schema": {"name": "any"}}, OutputConstraint()),
    ]
    for response_format, constraint in formats:
        response = client.post(path, json=base | {"response_format": response_format})
        assert response.status_code == 200, response.text
        assert fake.calls[-1][1].constraint == constraint


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"minimum": "one"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$schema": 5}}},
        {"type": "json_schema"},
        {"type": "xml"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": "not an object"}},
    ],
)
def test_bad_response_formats_are_400s(client: TestClient, response_format: dict) -> None:
    error = rejected(client, response_format=response_format)
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith("response_format")


def test_a_template_that_knows_tools_renders_them_itself(tmp_path, fake: FakeGenerator) -> None:
    template = tmp_path / "tools.jinja"
    template.write_text(
        "{% if tools %}TOOLS {{ tools | map(attribute='function') | map(attribute='name') | join(',') }}\n{% endif %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}{% if m.tool_calls %}"
        "{% for c in m.tool_calls %}[{{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}"
        "{% endif %}{% if m.tool_call_id %} ({{ m.tool_call_id }}){% endif %}{{ '\\n' }}{% endfor %}"
    )
    conversation = [
        *USER,
        {
            "role": "assistant",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "noon"},
    ]
    with TestClient(create_app(ServerSettings(chat_template=template), generator=fake)) as client:
        chat(client, messages=conversation, tools=[WEATHER, TIME])
    assert prompt_of(fake) == (
        "TOOLS get_weather,get_time\nuser: What is the weather in Paris?\nassistant: [get_time {}]\ntool: noon (c1)\n"
    )
