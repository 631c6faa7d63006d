"""``/v1/responses`` through the official OpenAI SDK against a real server: the Responses API on the chat use case."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
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

FLAT_WEATHER = {"type": "function", **WEATHER["function"], "strict": True}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=10)
    population: int = pydantic.Field(ge=0, le=99)


@pytest.fixture
def sdk(live_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tiny_sdk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    model = build_tiny_model(tmp_path_factory.mktemp("tiny-responses"), context_length=2048)
    with serve(create_app(ServerSettings(model=str(model), device="cpu"))) as base:
        wait_ready(base)
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)


def test_a_string_input_gets_a_completed_response(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.reply = "Hi there"
    response = sdk.responses.create(model="m", input="Hello", instructions="Be brief.")
    assert response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.output_text == "Hi there"
    [message] = response.output
    assert message.type == "message"
    assert message.id.startswith("msg_")
    assert fake.prompt_text() == "System: Be brief.\nUser: Hello\nAssistant:"
    assert response.usage is not None
    assert response.usage.input_tokens == len(fake.calls[-1][0])
    assert response.usage.output_tokens == len(b"Hi there") + 1
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0


def test_input_items_map_to_the_conversation(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    sdk.responses.create(
        model="m",
        input=[
            {"role": "developer", "content": "Rules."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]},
            {"role": "user", "content": "More"},
        ],
    )
    assert fake.prompt_text() == "Developer: Rules.\nUser: Hi\nAssistant: Hello\nUser: More\nAssistant:"


def test_max_output_tokens_makes_an_incomplete_response(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.reply = "a long answer"
    response = sdk.responses.create(model="m", input="Hello", max_output_tokens=3)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "a l"
    assert fake.calls[-1][1].max_new_tokens == 3


def test_sampling_and_huggingface_options_reach_the_generator(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    response = sdk.responses.create(
        model="m",
        input="Hello",
        temperature=0.5,
        top_p=0.9,
        metadata={"team": "a"},
        user="u1",
        extra_body={"seed": 7, "top_k": 5, "repetition_penalty": 1.1},
    )
    params = fake.calls[-1][1]
    assert (params.temperature, params.top_p, params.seed) == (0.5, 0.9, 7)
    assert params.options == {"top_k": 5, "repetition_penalty": 1.1}
    assert response.metadata == {"team": "a"}
    assert response.temperature == 0.5


def test_the_stream_follows_openais_event_sequence(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.reply = "Hi there"
    with sdk.responses.stream(model="m", input="Hello") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == final.output_text == "Hi there"
    assert final.status == "completed"


def test_a_streamed_response_equals_the_whole_one(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.reply = "Ünïcödé 你好 😀"
    whole = sdk.responses.create(model="m", input="Hello")
    streamed = list(sdk.responses.create(model="m", input="Hello", stream=True))
    done = streamed[-1]
    assert done.type == "response.completed"
    assert done.response.output_text == whole.output_text == fake.reply
    assert done.response.usage == whole.usage


def test_a_stream_cut_by_max_output_tokens_ends_incomplete(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    events = list(sdk.responses.create(model="m", input="Hello", max_output_tokens=2, stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_function_calls_are_output_items(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.reply = CALL
    response = sdk.responses.create(model="m", input="Weather in Oslo?", tools=[FLAT_WEATHER])
    [call] = response.output
    assert call.type == "function_call"
    assert call.name == "get_weather"
    assert call.call_id.startswith("call_")
    assert json.loads(call.arguments) == {"city": "Oslo", "unit": "celsius"}
    assert response.output_text == ""
    assert "get_weather" in fake.prompt_text()


def test_function_calls_stream_their_arguments(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.reply = CALL
    events = list(sdk.responses.create(model="m", input="Weather?", tools=[FLAT_WEATHER], stream=True))
    kinds = [event.type for event in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert json.loads(events[4].arguments) == {"city": "Oslo", "unit": "celsius"}
    assert events[-1].response.output[0].type == "function_call"


def test_function_call_outputs_go_back_to_the_model(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.replies = [CALL, "Snowy in Oslo."]
    first = sdk.responses.create(model="m", input="Weather in Oslo?", tools=[FLAT_WEATHER])
    [call] = first.output
    second = sdk.responses.create(
        model="m",
        input=[
            {"role": "user", "content": "Weather in Oslo?"},
            call.model_dump(),
            {"type": "function_call_output", "call_id": call.call_id, "output": "snow, -3 C"},
        ],
        tools=[FLAT_WEATHER],
    )
    assert second.output_text == "Snowy in Oslo."
    prompt = fake.prompt_text()
    assert '"name": "get_weather"' in prompt
    assert "<tool_response>\nsnow, -3 C\n</tool_response>" in prompt


def test_a_named_tool_choice_forces_that_call(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.reply = CALL
    sdk.responses.create(
        model="m", input="Weather?", tools=[FLAT_WEATHER], tool_choice={"type": "function", "name": "get_weather"}
    )
    constraint = fake.calls[-1][1].constraint
    assert constraint is not None
    assert constraint.wrapper is not None


def test_text_format_json_schema_constrains_the_output(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    schema = City.model_json_schema()
    fake.reply = '{"name": "Oslo", "population": 7}'
    response = sdk.responses.create(
        model="m",
        input="A city",
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
    )
    constraint = fake.calls[-1][1].constraint
    assert constraint is not None
    assert constraint.json_schema == schema
    assert json.loads(response.output_text) == {"name": "Oslo", "population": 7}
    sdk.responses.create(model="m", input="JSON", text={"format": {"type": "json_object"}})
    assert fake.calls[-1][1].constraint is not None


def test_an_invalid_schema_is_a_400_naming_text_format(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        sdk.responses.create(
            model="m",
            input="A city",
            text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}},
        )
    assert error.value.body["param"] == "text.format.schema"  # type: ignore[index]


def test_previous_response_id_continues_the_conversation(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.replies = ["Hi there", "Fine"]
    first = sdk.responses.create(model="m", input="Hello", instructions="Be brief.")
    second = sdk.responses.create(model="m", input="How are you?", previous_response_id=first.id)
    assert second.previous_response_id == first.id
    assert fake.prompt_text() == "User: Hello\nAssistant: Hi there\nUser: How are you?\nAssistant:"


def test_stored_responses_can_be_read_listed_and_deleted(sdk: openai.OpenAI) -> None:
    created = sdk.responses.create(model="m", input=[{"role": "user", "content": "Hello"}])
    assert sdk.responses.retrieve(created.id).output_text == created.output_text
    [item] = list(sdk.responses.input_items.list(created.id))
    assert item.type == "message"
    assert item.content[0].text == "Hello"
    sdk.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(created.id)


def test_input_items_are_listed_newest_first_in_pages(sdk: openai.OpenAI) -> None:
    texts = [f"m{n}" for n in range(5)]
    created = sdk.responses.create(model="m", input=[{"role": "user", "content": t} for t in texts])
    page = sdk.responses.input_items.list(created.id, limit=2)
    assert [item.content[0].text for item in page.data] == ["m4", "m3"]
    assert page.has_more
    everything = [item.content[0].text for item in sdk.responses.input_items.list(created.id, order="asc")]
    assert everything == texts


def test_store_false_keeps_nothing(sdk: openai.OpenAI) -> None:
    created = sdk.responses.create(model="m", input="Hello", store=False)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(created.id)
    with pytest.raises(openai.BadRequestError) as error:
        sdk.responses.create(model="m", input="Again", previous_response_id=created.id)
    assert error.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_the_store_evicts_the_least_recently_used(fake: FakeGenerator) -> None:
    with serve(create_app(ServerSettings(responses_store_size=2), generator=fake)) as base:
        sdk = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        first, second = (sdk.responses.create(model="m", input="Hello") for _ in range(2))
        sdk.responses.retrieve(first.id)  # first is now the most recently used
        sdk.responses.create(model="m", input="Hello")
        assert sdk.responses.retrieve(first.id).id == first.id
        with pytest.raises(openai.NotFoundError):
            sdk.responses.retrieve(second.id)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["v"]}]}, "tools[0].type"),
        ({"input": [{"type": "input_image_thing", "role": "user"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]}, "input[0].content"),
        ({"input": "x", "temperature": 3}, "temperature"),
        ({"input": 5}, "input"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": "x", "prompt": {"id": "pmpt_1"}}, "prompt"),
    ],
)
def test_what_is_not_offered_is_a_clear_400(live_url: str, body: dict, param: str) -> None:
    response = httpx.post(f"{live_url}/v1/responses", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]


def test_an_error_after_the_stream_started_is_response_failed(sdk: openai.OpenAI, fake: FakeGenerator) -> None:
    fake.fail_after = 2
    events = list(sdk.responses.create(model="m", input="Hello", stream=True))
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert events[-1].response.error is not None


def test_the_sdks_parse_helper_gets_a_pydantic_object(tiny_sdk: openai.OpenAI) -> None:
    response = tiny_sdk.responses.parse(model="m", input="A city.", text_format=City, max_output_tokens=300)
    city = response.output_parsed
    assert isinstance(city, City)
    jsonschema.validate(json.loads(response.output_text), City.model_json_schema())


def test_required_tools_on_a_real_model_give_valid_calls(tiny_sdk: openai.OpenAI) -> None:
    response = tiny_sdk.responses.create(
        model="m", input="Weather?", tools=[FLAT_WEATHER], tool_choice="required", max_output_tokens=300
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls
    for call in calls:
        assert call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])


def test_nullable_fields_may_be_null(live_url: str) -> None:
    body = {"input": "x", "store": None, "parallel_tool_calls": None, "background": None, "tool_choice": None}
    response = httpx.post(f"{live_url}/v1/responses", json=body)
    assert response.status_code == 200
    assert response.json()["store"] is True
    assert httpx.get(f"{live_url}/v1/responses/{response.json()['id']}").status_code == 200
