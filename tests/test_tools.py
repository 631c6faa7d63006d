"""Tool calling in the application layer: parsing calls out of text (whole or streamed), prompts and constraints."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from application.tools import (
    ToolCallParser,
    call_schema,
    check_tool_use,
    describe_tools,
    parse_tool_calls,
    tool_constraint,
)
from domain.errors import InvalidRequestError
from domain.messages import ChatMessage, Role
from domain.tools import FunctionTool, ToolCall, ToolChoice, ToolChoiceMode, ToolUse

WEATHER = FunctionTool(
    "get_weather",
    "The weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TIME = FunctionTool("get_time")
NAMES = ["get_weather", "get_time"]


def call(name: str, **arguments: object) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def streamed(text: str, cuts: list[int], names=NAMES) -> tuple[str, list[ToolCall]]:
    parser = ToolCallParser(frozenset(names))
    content, calls = "", []
    bounds = [0, *sorted(c % (len(text) + 1) for c in cuts), len(text)]
    for start, end in itertools.pairwise(bounds):
        piece, found = parser.push(text[start:end])
        content += piece
        calls += found
    piece, found = parser.flush()
    return content + piece, calls + list(found)


def test_a_tool_call_becomes_a_call_and_leaves_no_text() -> None:
    content, calls = parse_tool_calls(call("get_weather", city="Paris"), NAMES)
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]
    assert calls[0].id.startswith("call_")


def test_text_before_calls_stays_and_whitespace_between_them_goes() -> None:
    text = f"Let me check.\n{call('get_weather', city='Paris')}\n{call('get_time')}\n"
    content, calls = parse_tool_calls(text, NAMES)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1].arguments) == {}


def test_text_without_calls_is_untouched() -> None:
    for text in ("  Hello there!\n\n", "a < b and <tool", "{not json", ""):
        assert parse_tool_calls(text, NAMES) == (text, ())


def test_a_malformed_call_stays_text() -> None:
    text = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_tool_calls(text, NAMES) == (text, ())


def test_an_unclosed_call_at_the_end_still_counts_when_its_json_is_whole() -> None:
    _, calls = parse_tool_calls('<tool_call>\n{"name": "get_time", "arguments": {}}', NAMES)
    assert [c.name for c in calls] == ["get_time"]
    truncated = '<tool_call>\n{"name": "get_time", "argu'
    assert parse_tool_calls(truncated, NAMES) == (truncated, ())


def test_arguments_given_as_a_json_string_are_kept_as_they_are() -> None:
    body = json.dumps({"name": "get_weather", "arguments": '{"city": "Oslo"}'})
    _, calls = parse_tool_calls(f"<tool_call>{body}</tool_call>", NAMES)
    assert calls[0].arguments == '{"city": "Oslo"}'


def test_a_bare_json_call_naming_a_tool_is_a_call_llama_style() -> None:
    _, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Rome"}}', NAMES)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Rome"})]


def test_bare_json_that_is_not_a_call_stays_text() -> None:
    for text in ('{"name": "unknown", "arguments": {}}', '{"answer": 42}', '[{"name": "get_time"}]'):
        assert parse_tool_calls(text, NAMES) == (text, ())


def test_streaming_never_leaks_markup_and_holds_a_possible_tag() -> None:
    parser = ToolCallParser(frozenset(NAMES))
    assert parser.push("Sure <tool") == ("Sure", ())
    assert parser.push("_call>\n{") == ("", ())
    text, calls = parser.push('"name": "get_time", "arguments": {}}\n</tool_call>')
    assert text == ""
    assert [c.name for c in calls] == ["get_time"]
    assert parser.flush() == ("", ())


@given(
    pieces=st.lists(
        st.sampled_from(
            [
                "Hi",
                " ",
                "\n",
                "<",
                "tool",
                "<tool_call>",
                "</tool_call>",
                call("get_weather", city="Lyon"),
                call("get_time"),
                "{",
                "}",
                "text",
            ]
        ),
        max_size=8,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
)
def test_streamed_parsing_equals_parsing_the_whole_text(pieces: list[str], cuts: list[int]) -> None:
    text = "".join(pieces)
    whole_content, whole_calls = parse_tool_calls(text, NAMES)
    content, calls = streamed(text, cuts)
    assert content == whole_content
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]
    if not whole_calls:
        assert content == text


def test_a_named_choice_must_name_an_offered_tool() -> None:
    use = ToolUse((WEATHER,), ToolChoice(ToolChoiceMode.REQUIRED, "get_time"))
    with pytest.raises(InvalidRequestError) as error:
        check_tool_use(use)
    assert error.value.param == "tool_choice"


def test_required_needs_tools_and_names_must_be_distinct() -> None:
    with pytest.raises(InvalidRequestError):
        check_tool_use(ToolUse((), ToolChoice(ToolChoiceMode.REQUIRED)))
    with pytest.raises(InvalidRequestError) as error:
        check_tool_use(ToolUse((TIME, TIME)))
    assert error.value.param == "tools"


def test_only_forced_choices_constrain_the_output() -> None:
    assert tool_constraint(ToolUse((WEATHER,))) is None
    assert tool_constraint(ToolUse((WEATHER,), ToolChoice(ToolChoiceMode.NONE))) is None
    required = tool_constraint(ToolUse((WEATHER, TIME), ToolChoice(ToolChoiceMode.REQUIRED)))
    assert required is not None
    assert required.repeat
    assert required.param == "tools"
    assert required.wrapper == ("<tool_call>\n", "\n</tool_call>")
    single = tool_constraint(ToolUse((WEATHER, TIME), ToolChoice(ToolChoiceMode.REQUIRED), parallel=False))
    assert single is not None
    assert not single.repeat
    named = tool_constraint(ToolUse((WEATHER, TIME), ToolChoice(ToolChoiceMode.REQUIRED, "get_time")))
    assert named is not None
    assert not named.repeat
    assert named.json_schema is not None
    assert named.json_schema["properties"]["name"] == {"const": "get_time"}  # type: ignore[index]


def test_the_call_schema_accepts_exactly_calls_of_the_tools() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    nested = FunctionTool(
        "add_item",
        parameters={
            "type": "object",
            "properties": {"item": {"$ref": "#/$defs/Item"}},
            "required": ["item"],
            "$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}},
        },
    )
    schema = call_schema([WEATHER, nested])
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Paris"}}, schema)
    jsonschema.validate({"name": "add_item", "arguments": {"item": {"n": 1}}}, schema)
    for wrong in (
        {"name": "get_weather", "arguments": {}},
        {"name": "other", "arguments": {}},
        {"name": "add_item", "arguments": {"item": {"n": "one"}}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


def test_templates_without_tools_get_them_in_the_system_prompt_hermes_style() -> None:
    use = ToolUse((WEATHER,), ToolChoice(ToolChoiceMode.REQUIRED, "get_weather"))
    messages = describe_tools([ChatMessage(Role.SYSTEM, "Be brief."), ChatMessage(Role.USER, "Weather?")], use)
    system = messages[0].content
    assert system.startswith("Be brief.\n\n# Tools")
    assert "<tools>\n" + json.dumps(WEATHER.to_json()) + "\n</tools>" in system
    assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in system
    assert "You must call the function 'get_weather'." in system
    alone = describe_tools([ChatMessage(Role.USER, "Weather?")], ToolUse((WEATHER,)))
    assert alone[0].role is Role.SYSTEM
    assert alone[0].content.startswith("# Tools")


def test_earlier_calls_and_results_are_written_as_text_for_such_templates() -> None:
    history = [
        ChatMessage(Role.USER, "Weather in Paris and Rome?"),
        ChatMessage(
            Role.ASSISTANT,
            "",
            tool_calls=(
                ToolCall("call_1", "get_weather", '{"city": "Paris"}'),
                ToolCall("call_2", "get_weather", '{"city": "Rome"}'),
            ),
        ),
        ChatMessage(Role.TOOL, "sunny", tool_call_id="call_1"),
        ChatMessage(Role.TOOL, "rainy", tool_call_id="call_2"),
    ]
    messages = describe_tools(history, ToolUse((WEATHER,), ToolChoice(ToolChoiceMode.NONE)))
    assert [m.role for m in messages] == [Role.USER, Role.ASSISTANT, Role.USER]
    assert messages[1].content == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    assert messages[1].tool_calls == ()
    assert messages[2].content == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response>"
