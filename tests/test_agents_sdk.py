"""The openai-agents SDK, whose default model speaks the Responses API, runs an agent with a function tool."""

from __future__ import annotations

import asyncio
import json

import openai
from agents import Agent, RunConfig, Runner, function_tool
from agents.models.openai_provider import OpenAIProvider

from tests.fakes import FakeGenerator

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
asked: list[str] = []


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    asked.append(city)
    return f"snow in {city}"


def run_config(live_url: str) -> RunConfig:
    client = openai.AsyncOpenAI(base_url=f"{live_url}/v1", api_key="unused", max_retries=0)
    return RunConfig(model_provider=OpenAIProvider(openai_client=client), tracing_disabled=True)


def test_an_agent_calls_its_tool_and_answers(live_url: str, fake: FakeGenerator) -> None:
    fake.replies = [CALL, "Snowy in Oslo."]
    agent = Agent(name="Weather", instructions="Answer weather questions.", tools=[get_weather], model="m")
    result = Runner.run_sync(agent, "What is the weather in Oslo?", run_config=run_config(live_url))
    assert result.final_output == "Snowy in Oslo."
    assert asked == ["Oslo"]
    first, second = (fake.prompt_text(n) for n in range(2))
    assert "Answer weather questions." in first
    assert "get_weather" in first
    assert "<tool_response>\nsnow in Oslo\n</tool_response>" in second
    call = next(item for item in result.new_items if item.type == "tool_call_item")
    assert json.loads(call.raw_item.arguments) == {"city": "Oslo"}  # type: ignore[union-attr]


def test_an_agent_streams_its_answer(live_url: str, fake: FakeGenerator) -> None:
    fake.reply = "Hello there."
    agent = Agent(name="Greeter", instructions="Greet.", model="m")

    async def run() -> str:
        streamed = Runner.run_streamed(agent, "Hi", run_config=run_config(live_url))
        async for _ in streamed.stream_events():
            pass
        return str(streamed.final_output)

    assert asyncio.run(run()) == "Hello there."
