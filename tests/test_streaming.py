"""Streaming: OpenAI's event shapes, stream == non-stream, no leaked stop sequences, errors and disconnects."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient
from litestar.utils import sync as litestar_sync

from application.generation import complete
from domain.generation import Completion, TextDelta
from domain.messages import ChatMessage, Conversation, Role
from entrypoints.bootstrap import build_services
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator, generation_params
from tests.live_server import assert_counted_as_gone, leave_once_generating

USER = [{"role": "user", "content": "Hello"}]


def events_of(response) -> list:
    assert response.headers["content-type"].startswith("text/event-stream")
    raw = response.text
    assert raw.endswith("data: [DONE]\n\n")
    blocks = [block for block in raw.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in blocks)
    return [json.loads(block.removeprefix("data: ")) for block in blocks[:-1]]


def test_chat_stream_events_follow_openai(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "Hi!"
    response = client.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    events = events_of(response)
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events}) == 1
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in e["choices"][0]["delta"] for e in events[1:])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == "Hi!"
    assert [e["choices"][0]["finish_reason"] for e in events][-1] == "stop"
    assert events[-1]["choices"][0]["delta"] == {}


def test_include_usage_adds_a_final_usage_chunk(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "abc"
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    events = events_of(client.post("/v1/chat/completions", json=body))
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["completion_tokens"] == 4
    assert all(e["usage"] is None for e in events[:-1])


def test_completion_stream_events_follow_openai(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = " there"
    body = {"prompt": "Hi", "stream": True, "echo": True, "stream_options": {"include_usage": True}}
    events = events_of(client.post("/v1/completions", json=body))
    assert {e["object"] for e in events} == {"text_completion"}
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == "Hi there"
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "stop"
    assert events[-1]["usage"]["prompt_tokens"] == 2


def test_multi_token_stop_sequence_never_leaks_into_a_stream(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "keep this <|END|> not this"
    events = events_of(client.post("/v1/chat/completions", json={"messages": USER, "stream": True, "stop": "<|END|>"}))
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events]
    assert "".join(deltas) == "keep this "
    assert not any("<" in d for d in deltas)


def test_multibyte_characters_split_across_tokens_arrive_whole(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "naïve 日本語 🎉👍🏽 ok"
    events = events_of(client.post("/v1/chat/completions", json={"messages": USER, "stream": True}))
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events]
    assert "".join(deltas) == fake.reply
    assert not any("\ufffd" in d for d in deltas)


def test_an_error_after_the_stream_started_is_one_error_event(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "abcdef"
    fake.fail_after = 3
    response = client.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    assert response.status_code == 200
    events = events_of(response)
    assert "error" in events[-1]
    assert events[-1]["error"]["type"] == "server_error"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "abc"


def test_request_errors_are_still_plain_400s_when_streaming(client: TestClient, fake: FakeGenerator) -> None:
    fake.context_length = 8
    response = client.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"


def test_client_disconnect_stops_generation(live_url: str, fake: FakeGenerator) -> None:
    fake.reply = "x" * 400
    fake.step_delay = 0.01
    body = {"messages": USER, "stream": True, "max_tokens": 400}
    with (
        httpx.Client(timeout=10) as http,
        http.stream("POST", f"{live_url}/v1/chat/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        next(line for line in lines if '"content": "x"' in line)
    deadline = time.monotonic() + 5
    while fake.closed_early == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    produced = fake.produced
    time.sleep(0.3)
    assert fake.closed_early == 1
    assert fake.produced == produced, "generation went on after the client left"
    assert produced < 200


@pytest.mark.parametrize(
    ("path", "body"), [("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "Hello"})]
)
def test_a_stream_left_unread_stops_generation(live_url: str, fake: FakeGenerator, path: str, body: dict) -> None:
    """A client that leaves maybe before the stream's first byte was sent: the body's generators never start."""
    fake.reply = "x" * 2000
    fake.step_delay = 0.01
    leave_once_generating(live_url, path, body | {"stream": True, "max_tokens": 2000}, lambda: fake.produced)
    deadline = time.monotonic() + 30
    while fake.closed_early == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.closed_early == 1
    assert fake.produced < 1000


def test_client_disconnect_stops_a_non_streamed_generation(live_url: str, fake: FakeGenerator) -> None:
    fake.reply = "x" * 400
    fake.step_delay = 0.01
    body = {"messages": USER, "max_tokens": 400}
    leave_once_generating(live_url, "/v1/chat/completions", body, lambda: fake.produced)
    deadline = time.monotonic() + 5
    while fake.closed_early == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.closed_early == 1
    assert fake.produced < 200
    assert_counted_as_gone(live_url)


def test_a_streamed_chunk_takes_no_hop_through_the_thread_pool(
    client: TestClient, fake: FakeGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hooks Litestar calls for every message sent run on the event loop: a plain function would go to a thread."""
    hops = []

    def counted(function: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(function)
        return real(function, *args, **kwargs)

    real = litestar_sync.sync_to_thread
    monkeypatch.setattr(litestar_sync, "sync_to_thread", counted)
    counts = []
    for length in (4, 40):
        fake.reply = "x" * length
        hops.clear()
        text = client.post("/v1/chat/completions", json={"messages": USER, "stream": True}).text
        assert text.count('"content": "x"') == length
        counts.append(len(hops))
    assert counts[0] == counts[1], f"thread-pool hops grow with the chunks: {counts}, {hops}"


def test_health_answers_while_a_long_generation_runs(live_url: str, fake: FakeGenerator) -> None:
    fake.reply = "y" * 1000
    fake.step_delay = 0.02
    body = {"messages": USER, "stream": True, "max_tokens": 1000}
    with (
        httpx.Client(timeout=10) as http,
        http.stream("POST", f"{live_url}/v1/chat/completions", json=body) as response,
    ):
        next(response.iter_lines())
        started = time.monotonic()
        assert http.get(f"{live_url}/health").status_code == 200
        assert time.monotonic() - started < 5  # the generation takes 20 s and more
        assert fake.produced < 1000


async def _collect(fake: FakeGenerator, stop: list[str]) -> tuple[str, Completion, Completion]:
    services = build_services(ServerSettings(), fake)
    messages = Conversation(messages=(ChatMessage(Role.USER, "hi"),))
    params = generation_params(temperature=0, stop=tuple(stop))
    streamed = ""
    last = None
    async for event in services.chat.stream(messages, params):
        if isinstance(event, TextDelta):
            streamed += event.text
        else:
            last = event
    assert last is not None
    whole = await complete(services.chat.stream(messages, params))
    return streamed, last, whole


@settings(max_examples=60, deadline=None)
@given(
    reply=st.text(st.sampled_from("ab \n😀é日<|>"), max_size=40),
    stop=st.lists(st.text(st.sampled_from("ab😀<|>"), min_size=1, max_size=4), max_size=2),
)
def test_concatenated_deltas_equal_the_whole_answer(reply: str, stop: list[str]) -> None:
    fake = FakeGenerator(reply=reply)
    streamed, last, whole = asyncio.run(_collect(fake, stop))
    assert streamed == last.text == whole.text
    assert whole.finish_reason == last.finish_reason
    assert not any(s in whole.text for s in stop)
    assert whole.text == first_stop_cut(reply, stop)


def first_stop_cut(text: str, stops: list[str]) -> str:
    """What generation yields: the text is cut as soon as a stop sequence completes, at that sequence's start."""
    for end in range(len(text) + 1):
        present = [text.index(s) for s in stops if s in text[:end]]
        if present:
            return text[: min(present)]
    return text
