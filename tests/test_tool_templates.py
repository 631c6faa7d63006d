"""Chat templates and tools: what a tool-aware template sees, and how the renderer tells such templates apart."""

from __future__ import annotations

import json

from adapters.jinja_renderer import FALLBACK_TEMPLATE, JinjaTemplateRenderer
from domain.messages import ChatMessage, Role
from domain.tools import FunctionTool, ToolCall

TOOLS_TEMPLATE = (
    "{% if tools %}TOOLS={{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}[{{ m.role }}]"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.id }} {{ c.function.name }} "
    "{{ c.function.arguments | tojson }}{% endfor %}"
    "{% elif m.role == 'tool' %}RESULT {{ m.tool_call_id }} {{ m.content }}"
    "{% else %}{{ m.content }}{% endif %}{{ '\\n' }}{% endfor %}"
)
WEATHER = FunctionTool("get_weather", "Weather.", {"type": "object", "properties": {"city": {"type": "string"}}})


def test_a_template_that_reads_tools_supports_them_the_fallback_does_not() -> None:
    assert JinjaTemplateRenderer(TOOLS_TEMPLATE).supports_tools
    assert not JinjaTemplateRenderer(FALLBACK_TEMPLATE).supports_tools
    assert not JinjaTemplateRenderer("{% set tools = [] %}{{ tools }}").supports_tools


def test_tools_reach_the_template_in_huggingface_shape() -> None:
    rendered = JinjaTemplateRenderer(TOOLS_TEMPLATE).render(
        [ChatMessage(Role.USER, "Hi")], add_generation_prompt=True, tools=[WEATHER]
    )
    first = rendered.splitlines()[0]
    assert json.loads(first.removeprefix("TOOLS=")) == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]


def test_no_tools_means_tools_is_none() -> None:
    rendered = JinjaTemplateRenderer("{{ tools is none }}").render([], add_generation_prompt=False)
    assert rendered == "True"


def test_calls_carry_their_arguments_as_a_value_and_results_their_call_id() -> None:
    messages = [
        ChatMessage(Role.USER, "Weather?"),
        ChatMessage(Role.ASSISTANT, "", tool_calls=(ToolCall("call_9", "get_weather", '{"city": "Oslo"}'),)),
        ChatMessage(Role.TOOL, "snow", tool_call_id="call_9"),
    ]
    rendered = JinjaTemplateRenderer(TOOLS_TEMPLATE).render(messages, add_generation_prompt=False)
    assert rendered.splitlines() == [
        "[user]Weather?",
        '[assistant]CALL call_9 get_weather {"city": "Oslo"}',
        "[tool]RESULT call_9 snow",
    ]
