"""Request limits: body size (413) and ``--request-timeout``, which stops the generation and answers an error.

The context-window limits (prompt too long, ``max_tokens`` beyond the room left) are specified in test_http_api.
"""

from __future__ import annotations

import json
import time

import pytest
from litestar.testing import TestClient

from entrypoints.http.__main__ import parse_settings
from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


@pytest.fixture
def settings() -> ServerSettings:
    return ServerSettings(max_body_bytes=2048, request_timeout=0.3)


@pytest.fixture
def slow(fake: FakeGenerator) -> FakeGenerator:
    fake.reply = "z" * 300
    fake.step_delay = 0.01
    return fake


def error_of(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_a_body_over_the_limit_is_a_413_with_openais_error(client: TestClient, fake: FakeGenerator) -> None:
    response = client.post("/v1/completions", json={"prompt": "x" * 4096})
    assert response.status_code == 413
    assert error_of(response)["type"] == "invalid_request_error"
    assert fake.calls == []


def test_a_streamed_body_over_the_limit_is_refused_too(client: TestClient) -> None:
    chunks = (b'{"prompt": "' + b"x" * 512, *[b"x" * 512] * 6, b'"}')
    response = client.post("/v1/completions", content=iter(chunks), headers={"Content-Type": "application/json"})
    assert response.status_code == 413


def test_a_body_under_the_limit_is_served(client: TestClient) -> None:
    assert client.post("/v1/completions", json={"prompt": "x" * 1500, "max_tokens": 2}).status_code == 200


def test_a_request_over_its_time_gets_an_error_and_its_generation_stops(
    client: TestClient, slow: FakeGenerator
) -> None:
    started = time.monotonic()
    response = client.post("/v1/chat/completions", json=CHAT)
    assert time.monotonic() - started < 10  # the timeout is 0.3 s, the whole answer 3 s and more
    assert response.status_code == 504
    error = error_of(response)
    assert error["code"] == "request_timeout"
    assert error["type"] == "server_error"
    assert slow.closed_early == 1
    produced = slow.produced
    time.sleep(0.1)
    assert slow.produced == produced < 300


def test_a_stream_over_its_time_ends_with_one_error_event(client: TestClient, slow: FakeGenerator) -> None:
    response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 300, "stream": True})
    assert response.status_code == 200
    blocks = [block.removeprefix("data: ") for block in response.text.split("\n\n") if block]
    assert blocks[-1] == "[DONE]"
    last = json.loads(blocks[-2])
    assert last["error"]["code"] == "request_timeout"
    assert all("error" not in json.loads(block) for block in blocks[:-2])
    assert 0 < len(blocks) - 2 < 300
    assert slow.closed_early == 1


def test_a_request_within_its_time_is_untouched(client: TestClient, slow: FakeGenerator) -> None:
    response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5})
    assert response.status_code == 200
    assert response.json()["choices"][0]["text"] == "zzzzz"


def test_without_a_timeout_a_long_request_runs_to_its_end(slow: FakeGenerator) -> None:
    slow.step_delay = 0.002
    with TestClient(create_app(ServerSettings(), generator=slow)) as client:
        response = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 300})
    assert response.json()["usage"]["completion_tokens"] == 300


def test_the_limits_come_from_flags() -> None:
    settings = parse_settings(
        ["--max-body-bytes", "1000", "--request-timeout", "2.5", "--shutdown-timeout", "4"], environ={}
    )
    assert (settings.max_body_bytes, settings.request_timeout, settings.shutdown_timeout) == (1000, 2.5, 4.0)
    defaults = parse_settings([], environ={})
    assert (defaults.max_body_bytes, defaults.request_timeout, defaults.shutdown_timeout) == (4 * 1024 * 1024, None, 30)


@pytest.mark.parametrize("flag", ["--max-body-bytes", "--request-timeout", "--shutdown-timeout"])
@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_limits_must_be_above_zero(flag: str, value: str) -> None:
    with pytest.raises(SystemExit):
        parse_settings([flag, value], environ={})
