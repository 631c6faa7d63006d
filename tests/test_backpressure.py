"""Backpressure at the edge: the batch and queue flags, and a full queue answered with 429 and Retry-After."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import attrs
import pytest
from litestar.testing import TestClient

from domain.errors import QueueFullError
from domain.generation import GeneratedTokens, GenerationParams
from entrypoints.http.__main__ import parse_settings
from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator


@attrs.define
class BusyGenerator(FakeGenerator):
    """Every slot taken, every queue place too."""

    async def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams
    ) -> AsyncGenerator[GeneratedTokens, None]:
        self.calls.append((tuple(prompt_ids), params))
        raise QueueFullError("The server is busy: retry shortly.")
        yield GeneratedTokens()  # pragma: no cover  makes this an async generator


def test_a_full_queue_is_a_429_with_retry_after_and_an_openai_body():
    with TestClient(app=create_app(ServerSettings(), generator=BusyGenerator())) as client:
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    error = response.json()["error"]
    assert error["type"] == "rate_limit_exceeded"
    assert error["code"] == "queue_full"
    assert "busy" in error["message"]


def test_batch_and_queue_flags_reach_the_settings():
    settings = parse_settings(["--max-batch-size", "16", "--max-queue", "0"])
    assert (settings.max_batch_size, settings.max_queue) == (16, 0)
    defaults = parse_settings([])
    assert (defaults.max_batch_size, defaults.max_queue) == (8, 64)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-batch-size", "0"], "--max-batch-size: must be at least 1"),
        (["--max-queue", "-1"], "--max-queue: must be at least 0"),
    ],
)
def test_batch_and_queue_flags_must_make_sense(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_settings(argv)
    assert message in capsys.readouterr().err


def test_a_full_queue_is_a_429_for_a_streamed_request_too():
    with TestClient(app=create_app(ServerSettings(), generator=BusyGenerator())) as client:
        body = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
        response = client.post("/v1/chat/completions", json=body)
        completion = client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "queue_full"
    assert completion.status_code == 429
