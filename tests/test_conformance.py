"""What users arriving from OpenAI, vLLM and llama.cpp expect: model naming, headers, nulls, peers' extras."""

from __future__ import annotations

from litestar.testing import TestClient

from entrypoints.http.__main__ import parse_settings
from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator

USER = [{"role": "user", "content": "Hi"}]


def error_of(response: object, status: int = 400) -> dict:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    return response.json()["error"]  # type: ignore[attr-defined]


# Models and names ------------------------------------------------------------------------------------------------


def test_a_model_is_retrieved_by_its_id(client: TestClient) -> None:
    response = client.get("/v1/models/fake-model")
    assert response.status_code == 200, response.text
    assert response.json()["id"] == "fake-model"
    assert response.json()["object"] == "model"


def test_retrieving_an_unknown_model_is_a_404_model_not_found(client: TestClient) -> None:
    error = error_of(client.get("/v1/models/gpt-4o"), 404)
    assert error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error"
    assert "gpt-4o" in error["message"]


def test_served_model_names_are_aliases_and_the_first_is_the_reported_id(fake: FakeGenerator) -> None:
    settings = ServerSettings(served_model_names=("my-model", "org/other"))
    with TestClient(create_app(settings, generator=fake)) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["my-model"]
        assert client.get("/v1/models/org/other").json()["id"] == "org/other"
        assert client.get("/v1/models/my-model").status_code == 200
        assert client.get("/v1/models/fake-model").status_code == 404
        answer = client.post("/v1/chat/completions", json={"model": "org/other", "messages": USER}).json()
        assert answer["model"] == "my-model"


def test_served_model_name_is_repeatable_and_takes_several_values() -> None:
    settings = parse_settings(["--served-model-name", "a", "b", "--served-model-name", "c", "--served-model-name", "a"])
    assert settings.served_model_names == ("a", "b", "c")
    assert parse_settings([]).served_model_names == ()


# Headers and documents -------------------------------------------------------------------------------------------


def test_a_completion_carries_its_id_as_x_request_id(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER})
    assert response.headers["x-request-id"] == response.json()["id"]
    streamed = client.post("/v1/completions", json={"prompt": "Hi", "stream": True})
    assert streamed.headers["x-request-id"].startswith("cmpl-")


def test_the_clients_own_request_id_is_echoed(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json={"messages": USER}, headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


def test_every_other_response_carries_a_request_id_too(client: TestClient) -> None:
    for response in (
        client.get("/v1/models"),
        client.get("/health"),
        client.get("/nowhere"),
        client.post("/v1/chat/completions", json={"messages": []}),
    ):
        assert response.headers["x-request-id"]


def test_the_openapi_document_is_also_at_openapi_json(client: TestClient) -> None:
    response = client.get("/openapi.json")
    assert response.status_code == 200, response.text
    assert response.json() == client.get("/docs/openapi.json").json()
    assert "/v1/models/{model}" in response.json()["paths"]
