"""Graceful shutdown: stop listening, let requests finish within the grace, end the rest with an OpenAI error.

These run ``DrainingServer`` in a thread and ask it to exit as its signal handler does; test_server_process sends
a real SIGTERM to a real server process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from litestar.testing import TestClient

from entrypoints.http.app import create_app
from entrypoints.http.lifecycle import Drain, DrainingServer
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator
from tests.live_server import listening_socket, start_in_thread

USER = [{"role": "user", "content": "Hello"}]


@contextlib.contextmanager
def draining_server(fake: FakeGenerator, grace: float) -> Iterator[tuple[str, DrainingServer, threading.Thread]]:
    drain = Drain(grace=grace)
    app = create_app(ServerSettings(shutdown_timeout=grace), generator=fake, drain=drain)
    sock, port = listening_socket()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, timeout_graceful_shutdown=10)
    server = DrainingServer(config, drain)
    thread = start_in_thread(server, sock)
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server, thread
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def signal_exit(server: DrainingServer) -> None:
    """What ``handle_exit`` does on SIGTERM."""
    server.should_exit = True


def data_of(lines: Iterator[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


def assert_refuses_connections(base: str) -> None:
    deadline = time.monotonic() + 10  # generous: a busy machine may take a while to close the socket
    while True:
        try:
            httpx.get(f"{base}/health", timeout=1)
        except httpx.ConnectError:
            return
        assert time.monotonic() < deadline, "the server still accepts connections while draining"
        time.sleep(0.02)


def test_a_stream_that_fits_in_the_grace_finishes(fake: FakeGenerator) -> None:
    fake.reply = "w" * 60
    fake.step_delay = 0.01
    body = {"messages": USER, "stream": True}
    with (
        draining_server(fake, grace=5) as (base, server, thread),
        httpx.Client(timeout=10) as http,
        http.stream("POST", f"{base}/v1/chat/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        first = next(line for line in lines if '"content": "w"' in line)
        signal_exit(server)
        assert_refuses_connections(base)
        events = data_of(lines)
        assert events[-1] == "[DONE]"
        chunks = [json.loads(first.removeprefix("data: ")), *(json.loads(e) for e in events[:-1])]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == fake.reply
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert fake.closed_early == 0


def test_a_stream_longer_than_the_grace_ends_with_an_error_event(fake: FakeGenerator) -> None:
    fake.reply = "w" * 400
    fake.step_delay = 0.01
    body = {"messages": USER, "stream": True, "max_tokens": 400}
    with (
        draining_server(fake, grace=0.3) as (base, server, thread),
        httpx.Client(timeout=10) as http,
        http.stream("POST", f"{base}/v1/chat/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        next(line for line in lines if '"content": "w"' in line)
        signalled = time.monotonic()
        signal_exit(server)
        events = data_of(lines)
        ended = time.monotonic() - signalled
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "server_shutting_down"
    assert error["type"] == "service_unavailable"
    assert ended > 0.25  # the grace was given
    assert fake.closed_early == 1
    assert fake.produced < 200  # and then the generation stopped, long before its 400 tokens
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_a_whole_answer_longer_than_the_grace_gets_a_503(fake: FakeGenerator) -> None:
    fake.reply = "w" * 400
    fake.step_delay = 0.01
    body = {"messages": USER, "max_tokens": 400}
    with (
        draining_server(fake, grace=0.3) as (base, server, thread),
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        answer = pool.submit(httpx.post, f"{base}/v1/chat/completions", json=body, timeout=10)
        while fake.produced == 0:
            time.sleep(0.01)
        signal_exit(server)
        response = answer.result(timeout=5)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "server_shutting_down"
    assert response.headers["retry-after"]
    assert fake.closed_early == 1
    thread.join(timeout=5)
    assert not thread.is_alive()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_request_that_arrives_while_draining_is_refused(fake: FakeGenerator, path: str) -> None:
    app = create_app(ServerSettings(), generator=fake, drain=Drain(draining=True))
    with TestClient(app) as client:
        response = client.post(path, json={"messages": USER, "prompt": "x"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "server_shutting_down"
    assert fake.calls == []
