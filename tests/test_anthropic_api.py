"""``/v1/messages`` through the official Anthropic SDK against a real server: Messages on the chat use case."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import jsonschema
import pytest

from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator
from tests.live_server import serve, wait_ready
from tests.test_constrained_decoding import WEATHER
from tests.tiny_model import build_tiny_model

USER = [{"role": "user", "content": "Weather in Oslo?"}]
TOOL = {
    "name": "get_weather",
    "description": WEATHER["function"]["description"],
    "input_schema": WEATHER["function"]["parameters"],
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'


@pytest.fixture
def claude(live_url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=live_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tiny_claude(tmp_path_factory: pytest.TempPathFactory) -> Iterator[anthropic.Anthropic]:
    model = build_tiny_model(tmp_path_factory.mktemp("tiny-anthropic"), context_length=2048)
    with serve(create_app(ServerSettings(model=str(model), device="cpu"))) as base:
        wait_ready(base)
        yield anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)


def test_a_message_gets_text_content_and_usage(claude: anthropic.Anthropic, fake: FakeGenerator) -> None:
    fake.reply = "Hi there"
    message = claude.messages.create(
        model="m", max_tokens=100, system="Be brief.", messages=[{"role": "user", "content": "Hello"}]
    )
    assert message.id.startswith("msg_")
    assert message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Hi there"  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    assert message.usage.input_tokens == len(fake.calls[-1][0])
    assert message.usage.output_tokens == len(b"Hi there") + 1
    assert fake.prompt_text() == "System: Be brief.\nUser: Hello\nAssistant:"


def test_system_blocks_and_text_blocks_are_joined(claude: anthropic.Anthropic, fake: FakeGenerator) -> None:
    claude.messages.create(
        model="m",
        max_tokens=10,
        system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Hello"}]},
            {"role": "user", "content": "More"},
        ],
    )
    assert fake.prompt_text() == "System: Be brief.\nUser: Hi\nAssistant: Hello\nUser: More\nAssistant:"


def test_sampling_options_reach_the_generator(claude: anthropic.Anthropic, fake: FakeGenerator) -> None:
    claude.messages.create(
        model="m",
        max_tokens=7,
        metadata={"user_id": "u"},
        messages=USER,
        extra_body={"temperature": 0.3, "top_p": 0.8, "top_k": 4},
    )
    params = fake.calls[-1][1]
    assert (params.max_new_tokens, params.temperature, params.top_p, params.options) == (7, 0.3, 0.8, {"top_k": 4})


def test_max_tokens_ends_with_stop_reason_max_tokens(claude: anthropic.Anthropic, fake: FakeGenerator) -> None:
    fake.reply = "a long answer"
    message = claude.messages.create(model="m", max_tokens=3, messages=USER)
    assert message.stop_reason == "max_tokens"
    assert message.content[0].text == "a l"  # type: ignore[union-attr]


def test_a_stop_sequence_is_named_in_the_answer(claude: anthropic.Anthropic, fake: FakeGenerator) -> None:
    fake.reply = "one. two. three"
    message = claude.messages.create(model="m", max_tokens=100, stop_sequences=["END", ". t"], messages=USER)
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == ". t"
    assert message.content[0].text == "one"  # type: ignore[union-attr]


def test_tool_calls_are_tool_use_blocks(claude: anthropic.Anthropic, fake: FakeGenerator) -> None:
    fake.reply = CALL
    message = claude.messages.create(model="m", max_tokens=200, tools=[TOOL], messages=USER)
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use"
    assert block.name == "get_weather"
    assert block.input == {"city": "Oslo", "unit": "celsius"}
    assert "get_weather" in fake.prompt_text()


def test_tool_results_go_back_to_the_model(claude: anthropic.Anthropic, fake: FakeGenerator) -> None:
    fake.replies = [CALL, "Snowy in Oslo."]
    first = claude.messages.create(model="m", max_tokens=200, tools=[TOOL], messages=USER)
    [use] = first.content
    second = claude.messages.create(
        model="m",
        max_tokens=200,
        tools=[TOOL],
        messages=[
            *USER,
            {"role": "assistant", "content": [block.model_dump() for block in first.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "snow, -3 C"}],  # type: ignore[union-attr]
            },
        ],
    )
    assert second.content[0].text == "Snowy in Oslo."  # type: ignore[union-attr]
    prompt = fake.prompt_text()
    assert '"name": "get_weather"' in prompt
    assert "<tool_response>\nsnow, -3 C\n</tool_response>" in prompt


@pytest.mark.parametrize(
    ("choice", "forced", "shown"),
    [
        ({"type": "auto"}, False, True),
        ({"type": "any"}, True, True),
        ({"type": "tool", "name": "get_weather"}, True, True),
        ({"type": "none"}, False, False),
    ],
)
def test_tool_choice_maps_to_the_shared_tool_choice(
    claude: anthropic.Anthropic, fake: FakeGenerator, choice: dict, forced: bool, shown: bool
) -> None:
    fake.reply = CALL
    claude.messages.create(model="m", max_tokens=200, tools=[TOOL], tool_choice=choice, messages=USER)  # type: ignore[arg-type]
    assert (fake.calls[-1][1].constraint is not None) is forced
    assert ("get_weather" in fake.prompt_text()) is shown


def test_the_stream_follows_anthropics_events(claude: anthropic.Anthropic, fake: FakeGenerator) -> None:
    fake.reply = "Hi there"
    with claude.messages.stream(model="m", max_tokens=100, messages=USER) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start"
    assert kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == "Hi there"  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == len(b"Hi there") + 1


def test_the_raw_stream_has_named_events_and_a_ping(live_url: str, fake: FakeGenerator) -> None:
    fake.reply = CALL
    body = {"model": "m", "max_tokens": 200, "stream": True, "tools": [TOOL], "messages": USER}
    response = httpx.post(f"{live_url}/v1/messages", json=body)
    blocks = [block.split("\n") for block in response.text.split("\n\n") if block.strip()]
    events = [(lines[0].removeprefix("event: "), json.loads(lines[1].removeprefix("data: "))) for lines in blocks]
    assert all(name == data["type"] for name, data in events)
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[2][1]["content_block"]["type"] == "tool_use"
    assert json.loads(events[3][1]["delta"]["partial_json"]) == {"city": "Oslo", "unit": "celsius"}
    assert events[5][1]["delta"]["stop_reason"] == "tool_use"


def test_a_streamed_message_equals_the_whole_one(claude: anthropic.Anthropic, fake: FakeGenerator) -> None:
    fake.reply = "Ünïcödé 你好 😀"
    whole = claude.messages.create(model="m", max_tokens=100, messages=USER)
    with claude.messages.stream(model="m", max_tokens=100, messages=USER) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text == whole.content[0].text == fake.reply  # type: ignore[union-attr]
    assert streamed.usage.output_tokens == whole.usage.output_tokens
    assert streamed.usage.input_tokens == whole.usage.input_tokens


def test_output_config_format_constrains_the_answer(claude: anthropic.Anthropic, fake: FakeGenerator) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    fake.reply = '{"city": "Oslo"}'
    message = claude.messages.create(
        model="m",
        max_tokens=50,
        messages=USER,
        output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
    )
    constraint = fake.calls[-1][1].constraint
    assert constraint is not None
    assert constraint.json_schema == schema
    assert json.loads(message.content[0].text) == {"city": "Oslo"}  # type: ignore[union-attr]


def test_count_tokens_counts_the_rendered_prompt(claude: anthropic.Anthropic, fake: FakeGenerator) -> None:
    counted = claude.messages.count_tokens(model="m", system="Be brief.", messages=[{"role": "user", "content": "Hi"}])
    assert counted.input_tokens == len(b"System: Be brief.\nUser: Hi\nAssistant:")
    with_tools = claude.messages.count_tokens(model="m", tools=[TOOL], messages=USER)  # type: ignore[list-item]
    assert with_tools.input_tokens > len(b"User: Weather in Oslo?\nAssistant:")
    assert fake.calls == []


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "messages": USER},
        {"model": "m", "max_tokens": 0, "messages": USER},
        {"model": "m", "max_tokens": 5, "messages": []},
        {"model": "m", "max_tokens": 5, "messages": USER, "temperature": 1.5},
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
        {"model": "m", "max_tokens": 5, "messages": USER, "tools": [{"type": "web_search_20250305", "name": "w"}]},
    ],
)
def test_invalid_requests_get_anthropics_error_envelope(live_url: str, body: dict) -> None:
    response = httpx.post(f"{live_url}/v1/messages", json=body)
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"]


def test_the_sdk_raises_its_own_errors(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as error:
        claude.messages.create(model="m", max_tokens=0, messages=USER)  # type: ignore[arg-type]
    assert "max_tokens" in str(error.value)


def test_unknown_paths_under_messages_are_anthropic_404s(live_url: str) -> None:
    response = httpx.post(f"{live_url}/v1/messages/batches", json={})
    assert response.status_code in {404, 405}
    assert response.json()["type"] == "error"


def test_the_api_key_is_accepted_as_x_api_key_or_bearer(fake: FakeGenerator) -> None:
    with serve(create_app(ServerSettings(api_keys=("secret",)), generator=fake)) as base:
        good = anthropic.Anthropic(base_url=base, api_key="secret", max_retries=0)
        assert good.messages.create(model="m", max_tokens=5, messages=USER).content
        bearer = anthropic.Anthropic(base_url=base, auth_token="secret", max_retries=0)
        assert bearer.messages.create(model="m", max_tokens=5, messages=USER).content
        with pytest.raises(anthropic.AuthenticationError) as error:
            anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(
                model="m", max_tokens=5, messages=USER
            )
        assert error.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        response = httpx.post(
            f"{base}/v1/messages",
            headers={"x-api-key": "secret", "anthropic-version": "1999-01-01"},
            json={"model": "m", "max_tokens": 5, "messages": USER},
        )
        assert response.status_code == 200


def test_a_failure_after_the_stream_started_is_an_error_event(live_url: str, fake: FakeGenerator) -> None:
    fake.fail_after = 2
    body = {"model": "m", "max_tokens": 100, "stream": True, "messages": USER}
    response = httpx.post(f"{live_url}/v1/messages", json=body, timeout=60)
    last = [block for block in response.text.split("\n\n") if block.strip()][-1]
    assert last.startswith("event: error\n")
    assert json.loads(last.split("data: ", 1)[1])["error"]["type"] == "api_error"


def test_forced_tool_use_on_a_real_model_gives_valid_input(tiny_claude: anthropic.Anthropic) -> None:
    message = tiny_claude.messages.create(
        model="m",
        max_tokens=300,
        tools=[TOOL],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        messages=USER,
        extra_body={"temperature": 0},
    )
    [use] = [block for block in message.content if block.type == "tool_use"]
    assert message.stop_reason == "tool_use"
    jsonschema.validate(use.input, TOOL["input_schema"])
