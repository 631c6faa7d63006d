"""The served OpenAPI schema documents every endpoint, and real requests and responses validate against it."""

from __future__ import annotations

import json

import jsonschema
import pytest
from litestar.testing import TestClient

from tests.fakes import FakeGenerator

USER = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def spec(client: TestClient) -> dict:
    return client.get("/docs/openapi.json").json()


def validate(spec: dict, schema: dict, instance: object) -> None:
    jsonschema.validate(instance, schema | {"components": spec["components"]})


def request_schema(spec: dict, path: str) -> dict:
    return spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def response_schema(spec: dict, path: str, method: str = "post") -> dict:
    return spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]


def test_every_endpoint_is_documented(spec: dict) -> None:
    assert {"/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/tokenize", "/detokenize"} <= set(
        spec["paths"]
    )
    for path in ("/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"):
        assert request_schema(spec, path)["type"] == "object"


def test_request_schema_lists_the_fields_and_their_ranges(spec: dict) -> None:
    chat = request_schema(spec, "/v1/chat/completions")
    assert chat["required"] == ["messages"]
    for field in ("messages", "temperature", "top_p", "max_tokens", "stream", "stop", "seed", "top_k", "num_beams"):
        assert field in chat["properties"], field
    temperature = next(s for s in chat["properties"]["temperature"]["oneOf"] if s["type"] == "number")
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    assert "prompt" in request_schema(spec, "/v1/completions")["properties"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": USER, "max_tokens": 5}),
        ("/v1/chat/completions", {"messages": USER, "n": 2, "logprobs": True, "top_logprobs": 2}),
        ("/v1/completions", {"prompt": "Hi", "echo": True, "logprobs": 2}),
        ("/v1/completions", {"prompt": ["a", "b"], "max_tokens": 3}),
        ("/tokenize", {"prompt": "Hi", "return_token_strs": True}),
        ("/detokenize", {"tokens": [73, 106]}),
    ],
)
def test_real_requests_and_responses_validate(client: TestClient, spec: dict, path: str, body: dict) -> None:
    validate(spec, request_schema(spec, path), body)
    response = client.post(path, json=body)
    assert response.status_code == 200
    validate(spec, response_schema(spec, path), response.json())


def test_models_response_validates(client: TestClient, spec: dict) -> None:
    validate(spec, response_schema(spec, "/v1/models", "get"), client.get("/v1/models").json())


def test_streamed_chunks_have_the_documented_fields(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "ok"
    raw = client.post("/v1/chat/completions", json={"messages": USER, "stream": True}).text
    chunks = [json.loads(b.removeprefix("data: ")) for b in raw.split("\n\n") if b.startswith("data: {")]
    assert all({"id", "object", "created", "model", "choices"} <= set(chunk) for chunk in chunks)
