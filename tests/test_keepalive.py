"""SSE keep-alive: a stream that stays silent (a long prefill, a slow model) sends ``: ping`` comments."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import openai
import pytest
from litestar.response import ServerSentEventMessage

from entrypoints.http.__main__ import parse_settings
from entrypoints.http.app import create_app
from entrypoints.http.streaming import PING, keepalive
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator
from tests.live_server import serve

USER = [{"role": "user", "content": "Hello"}]
STREAMS = [
    ("/v1/chat/completions", {"messages": USER, "stream": True}),
    ("/v1/completions", {"prompt": "Hello", "stream": True}),
    ("/v1/responses", {"input": "Hello", "stream": True}),
    ("/v1/messages", {"messages": USER, "max_tokens": 10, "stream": True}),
]


@pytest.fixture
def slow_url(fake: FakeGenerator) -> Iterator[str]:
    fake.reply = "ab"
    fake.step_delay = 0.4
    with serve(create_app(ServerSettings(sse_keepalive=0.05), generator=fake)) as base:
        yield base


@pytest.mark.parametrize(("path", "body"), STREAMS)
def test_every_stream_pings_while_it_is_silent(slow_url: str, path: str, body: dict) -> None:
    response = httpx.post(f"{slow_url}{path}", json=body, timeout=30)
    assert response.status_code == 200
    lines = response.text.splitlines()
    assert ": ping" in lines
    first_text = next(n for n, line in enumerate(lines) if '"a"' in line)
    assert ": ping" in lines[:first_text], "a slow prefill pings before the first text"


def test_clients_ignore_the_pings(slow_url: str) -> None:
    sdk = openai.OpenAI(base_url=f"{slow_url}/v1", api_key="unused", max_retries=0)
    chunks = sdk.chat.completions.create(model="m", messages=USER, stream=True)  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ab"
    with sdk.responses.stream(model="m", input="Hello") as stream:
        assert stream.get_final_response().output_text == "ab"


def test_a_busy_stream_sends_no_pings(fake: FakeGenerator) -> None:
    with serve(create_app(ServerSettings(sse_keepalive=30), generator=fake)) as base:
        response = httpx.post(f"{base}/v1/chat/completions", json={"messages": USER, "stream": True})
    assert ": ping" not in response.text


def test_a_failure_after_the_stream_started_on_keepalive_is_an_error_event(fake: FakeGenerator) -> None:
    fake.step_delay = 0.3
    fake.fail_after = 0
    with serve(create_app(ServerSettings(sse_keepalive=0.05), generator=fake)) as base:
        response = httpx.post(f"{base}/v1/chat/completions", json={"messages": USER, "stream": True})
    assert response.status_code == 200
    assert '"server_error"' in response.text
    assert response.text.endswith("data: [DONE]\n\n")


def test_keepalive_closes_what_it_wraps() -> None:
    closed = asyncio.Event()

    async def slow() -> AsyncIterator[ServerSentEventMessage]:
        try:
            await asyncio.sleep(10)
            yield ServerSentEventMessage(data="never")
        finally:
            closed.set()

    async def run() -> list[ServerSentEventMessage]:
        stream = keepalive(slow(), 0.01)
        seen = [await anext(stream), await anext(stream)]
        await stream.aclose()  # type: ignore[attr-defined]
        return seen

    assert asyncio.run(run()) == [PING, PING]
    assert closed.is_set()


def test_the_flag_sets_the_interval_and_zero_turns_it_off() -> None:
    assert parse_settings([]).sse_keepalive == 10.0
    assert parse_settings(["--sse-keepalive", "2.5"]).sse_keepalive == 2.5
    assert parse_settings(["--sse-keepalive", "0"]).sse_keepalive is None
    assert parse_settings(["--responses-store-size", "3"]).responses_store_size == 3
