"""Per-request structlog records: what the seed promises at INFO, and the switch that keeps content out."""

from __future__ import annotations

import structlog
from litestar.testing import TestClient

from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator


def request_logs(client: TestClient, path: str, body: dict) -> tuple[dict, list[dict]]:
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        response = client.post(path, json=body)
    return response.json(), logs


def test_a_chat_request_logs_every_promised_record_under_its_id(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "Hi"
    body, logs = request_logs(
        client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "temperature": 0}
    )
    events = {entry["event"]: entry for entry in logs}
    assert {entry["request_id"] for entry in logs} == {body["id"]}
    assert events["request.received"]["parameters"] == {"temperature": 0}
    assert events["chat.message"]["content"] == "Hello"
    assert events["prompt.tokenized"]["prompt"] == "User: Hello\nAssistant:"
    assert events["prompt.tokenized"]["input_ids"] == list(fake.calls[-1][0])
    assert events["generation.finished"]["generated_ids"] == [ord("H") + 1, ord("i") + 1, 0]
    assert events["generation.finished"]["raw_text"] == "Hi</s>"
    assert events["generation.finished"]["response"] == "Hi"
    assert events["usage"]["total_tokens"] == body["usage"]["total_tokens"]
    assert all(entry["log_level"] == "info" for entry in logs)


def test_a_streamed_request_logs_the_same_record_when_the_stream_ends(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "Hi"
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        client.post("/v1/completions", json={"prompt": "x", "stream": True})
    names = [entry["event"] for entry in logs]
    assert names[-2:] == ["generation.finished", "usage"]
    assert len({entry["request_id"] for entry in logs}) == 1


def test_content_logging_can_be_switched_off(fake: FakeGenerator) -> None:
    with TestClient(create_app(ServerSettings(log_content=False), generator=fake)) as client:
        _, logs = request_logs(client, "/v1/chat/completions", {"messages": [{"role": "user", "content": "secret"}]})
    assert "secret" not in repr(logs)
    assert any(entry["event"] == "usage" for entry in logs)
