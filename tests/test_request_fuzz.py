"""Any body, however wrong, gets an answer or an OpenAI 4xx: never a 5xx, never an exception.

Two kinds of input: arbitrary JSON values, and near-valid bodies mutated from valid ones (a known field set to
something odd, a required one removed, a message bent out of shape), which reach deeper into structuring.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator

import attrs
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient

from entrypoints.http.app import create_app
from entrypoints.http.openai_requests import ChatCompletionRequest, CompletionRequest
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
VALID = {
    CHAT: {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    COMPLETIONS: {"prompt": "Hi", "max_tokens": 4},
}
FIELDS = {
    CHAT: sorted(field.name for field in attrs.fields(ChatCompletionRequest)),
    COMPLETIONS: sorted(field.name for field in attrs.fields(CompletionRequest)),
}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
plausible = (
    st.integers(min_value=-3, max_value=300)
    | st.floats(min_value=-3, max_value=3)
    | st.sampled_from(["", "user", "assistant", "system", "tool", "text", "never", "\x00", "🎉"])
    | st.lists(st.text(max_size=4), max_size=3)
    | st.lists(st.integers(min_value=-1, max_value=300), max_size=3)
    | st.lists(st.lists(st.integers(min_value=-1, max_value=300), max_size=3), max_size=2)
    | st.fixed_dictionaries({}, optional={"include_usage": st.booleans(), "type": st.text(max_size=5)})
)
odd = plausible | json_values


@st.composite
def near_valid(draw: st.DrawFn, path: str) -> dict:
    """A valid body for ``path`` with one to three things bent."""
    body = copy.deepcopy(VALID[path])
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        action = draw(st.sampled_from(["set", "set", "delete", "unknown", "message"]))
        if action == "set":
            body[draw(st.sampled_from(FIELDS[path]))] = draw(odd)
        elif action == "delete" and body:
            del body[draw(st.sampled_from(sorted(body)))]
        elif action == "unknown":
            body[draw(st.text(min_size=1, max_size=10))] = draw(odd)
        elif action == "message" and isinstance(body.get("messages"), list) and body["messages"]:
            message = body["messages"][0]
            if isinstance(message, dict):
                message[draw(st.sampled_from(["role", "content", "name", "tool_calls", "extra"]))] = draw(
                    odd | st.lists(st.fixed_dictionaries({"type": odd}, optional={"text": odd}), max_size=2)
                )
    return body


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(ServerSettings(), generator=FakeGenerator(reply="ok"))) as test_client:
        yield test_client


def assert_answered_or_refused(response) -> None:
    """2xx with a well-formed answer, or 4xx with OpenAI's error body; never a server error."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["type"] == "invalid_request_error"
        assert isinstance(body["error"]["message"], str)
        assert body["error"]["message"]
        return
    if response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n")
        for block in response.text.split("\n\n")[:-2]:
            data = json.loads(block.removeprefix("data: "))
            assert "error" not in data or data["error"]["type"] != "server_error", data
    else:
        assert response.json()["choices"]


def post(client: TestClient, path: str, content: bytes) -> None:
    response = client.post(path, content=content, headers={"Content-Type": "application/json"})
    event(f"status {response.status_code}")
    assert_answered_or_refused(response)


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@FUZZ
@given(body=json_values)
def test_any_json_value_is_answered_or_refused(client: TestClient, path: str, body: object) -> None:
    post(client, path, json.dumps(body).encode())


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@FUZZ
@given(data=st.data())
def test_near_valid_bodies_are_answered_or_refused(client: TestClient, path: str, data: st.DataObject) -> None:
    body = data.draw(near_valid(path))
    post(client, path, json.dumps(body).encode())


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@settings(max_examples=60, deadline=None)
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_bytes_that_are_not_json_are_refused(client: TestClient, path: str, raw: bytes) -> None:
    post(client, path, raw)
