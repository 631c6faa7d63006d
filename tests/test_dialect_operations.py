"""The Responses and Messages endpoints are operated as chat is: metrics, logs, keys, limits, disconnects, drains,
and the OpenAPI schema.
"""

from __future__ import annotations

import time

import httpx
import jsonschema
import pytest
import structlog
from litestar.testing import TestClient

from entrypoints.http.app import create_app
from entrypoints.http.lifecycle import Drain
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator
from tests.live_server import leave_once_generating
from tests.test_backpressure import BusyGenerator

USER = [{"role": "user", "content": "Hello"}]
RESPONSES = ("/v1/responses", {"input": "Hello"})
MESSAGES = ("/v1/messages", {"messages": USER, "max_tokens": 50})
DIALECTS = [RESPONSES, MESSAGES]


def error_of(path: str, response: httpx.Response) -> dict:
    """The error object, whichever envelope the dialect uses."""
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error"
    return body["error"]


@pytest.mark.parametrize(("path", "body"), DIALECTS)
def test_requests_and_tokens_are_counted_per_endpoint(client: TestClient, path: str, body: dict) -> None:
    assert client.post(path, json=body).status_code == 200
    assert client.post(path, json=body | {"stream": True}).status_code == 200
    metrics = client.get("/metrics").text
    assert f'hf_openai_requests_total{{endpoint="{path}",method="POST",status="200"}} 2.0' in metrics
    assert f'hf_openai_completion_tokens_total{{endpoint="{path}"}}' in metrics


@pytest.mark.parametrize(("path", "body"), DIALECTS)
def test_every_log_record_carries_the_response_id(client: TestClient, path: str, body: dict) -> None:
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        answer = client.post(path, json=body).json()
    assert {entry.get("request_id") for entry in logs} == {answer["id"]}
    events = [entry["event"] for entry in logs]
    assert {"request.received", "chat.message", "prompt.tokenized", "generation.finished", "usage"} <= set(events)


@pytest.mark.parametrize(
    ("path", "body"), [*DIALECTS, ("/v1/messages/count_tokens", {"messages": USER}), ("/v1/responses/x", None)]
)
def test_the_api_key_guards_the_new_endpoints(fake: FakeGenerator, path: str, body: dict | None) -> None:
    with TestClient(create_app(ServerSettings(api_keys=("k",)), generator=fake)) as client:
        refused = client.post(path, json=body) if body is not None else client.get(path)
        allowed = (
            client.post(path, json=body, headers={"Authorization": "Bearer k"})
            if body is not None
            else client.get(path, headers={"Authorization": "Bearer k"})
        )
    assert refused.status_code == 401
    assert error_of(path, refused)["message"]
    assert allowed.status_code in {200, 404}


@pytest.mark.parametrize(("path", "body"), DIALECTS)
def test_a_full_queue_is_a_429(path: str, body: dict) -> None:
    with TestClient(app=create_app(ServerSettings(), generator=BusyGenerator())) as client:
        whole = client.post(path, json=body)
        streamed = client.post(path, json=body | {"stream": True})
    for response in (whole, streamed):
        assert response.status_code == 429
        assert response.headers["retry-after"]
        assert "busy" in error_of(path, response)["message"]


@pytest.mark.parametrize(("path", "body"), DIALECTS)
def test_a_request_that_arrives_while_draining_is_refused(fake: FakeGenerator, path: str, body: dict) -> None:
    with TestClient(create_app(ServerSettings(), generator=fake, drain=Drain(draining=True))) as client:
        response = client.post(path, json=body)
    assert response.status_code == 503
    assert error_of(path, response)["message"]
    assert fake.calls == []


@pytest.mark.parametrize(("path", "body"), DIALECTS)
@pytest.mark.parametrize("leaving", ["a stream after its first text", "a stream unread", "a whole answer"])
def test_a_client_that_leaves_stops_the_generation(
    live_url: str, fake: FakeGenerator, path: str, body: dict, leaving: str
) -> None:
    stream, reads = leaving.startswith("a stream"), leaving.endswith("text")
    fake.reply = "x" * 2000
    fake.step_delay = 0.01  # 20 s for the whole reply: leaving must stop it long before
    request = body | {"stream": stream, "max_output_tokens": 2000, "max_tokens": 2000}
    if path == "/v1/responses":
        del request["max_tokens"]
    if reads:  # leaves after its first text, however long that takes on a loaded machine
        with httpx.Client(timeout=30) as http, http.stream("POST", f"{live_url}{path}", json=request) as response:
            next(line for line in response.iter_lines() if '"x' in line)
    else:  # leaves once the first token is out, maybe before the stream's first byte was sent
        leave_once_generating(live_url, path, request, lambda: fake.produced)
    deadline = time.monotonic() + 30
    while fake.closed_early == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.closed_early == 1
    assert fake.produced < 1000


def test_a_request_timeout_ends_a_response_stream_with_response_failed(fake: FakeGenerator) -> None:
    fake.reply = "x" * 400
    fake.step_delay = 0.01
    with TestClient(create_app(ServerSettings(request_timeout=0.2), generator=fake)) as client:
        text = client.post("/v1/responses", json={"input": "Hello", "stream": True}).text
    assert "event: response.failed" in text
    assert '"request_timeout"' in text


@pytest.fixture
def spec(client: TestClient) -> dict:
    return client.get("/docs/openapi.json").json()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        RESPONSES,
        ("/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}]}),
        MESSAGES,
        ("/v1/messages/count_tokens", {"messages": USER}),
    ],
)
def test_the_schema_describes_the_new_endpoints(client: TestClient, spec: dict, path: str, body: dict) -> None:
    operation = spec["paths"][path]["post"]
    request = operation["requestBody"]["content"]["application/json"]["schema"]
    jsonschema.validate(body, request | {"components": spec["components"]})
    response = client.post(path, json=body)
    assert response.status_code == 200
    documented = operation["responses"]["200"]["content"]["application/json"]["schema"]
    jsonschema.validate(response.json(), documented | {"components": spec["components"]})


def test_the_schema_lists_the_stored_response_routes(spec: dict) -> None:
    assert {"get", "delete"} <= set(spec["paths"]["/v1/responses/{response_id}"])
    assert "get" in spec["paths"]["/v1/responses/{response_id}/input_items"]
    messages = spec["paths"]["/v1/messages"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(messages["required"]) == {"messages", "max_tokens"}
