"""API keys on /v1, /tokenize and /detokenize, open operational routes, CORS, and the warning when left open."""

from __future__ import annotations

import re

import openai
import pytest
import structlog
from litestar.testing import TestClient

from entrypoints.http.__main__ import parse_settings
from entrypoints.http.app import create_app
from entrypoints.http.security import APIKeys, is_protected, warn_if_exposed
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator

KEYS = ("sk-first", "sk-second")
CHAT = {"messages": [{"role": "user", "content": "Hi"}]}
ORIGIN = "https://app.example"


@pytest.fixture
def settings() -> ServerSettings:
    return ServerSettings(api_keys=KEYS)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_request_without_a_key_gets_openais_401(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    assert error["code"] == "invalid_api_key"
    assert "Authorization" in error["message"]


@pytest.mark.parametrize(
    "authorization", ["Bearer sk-wrong", "Bearer sk-first-and-more", "Bearer sk-firs", "Basic sk-first", "sk-first"]
)
def test_a_wrong_key_or_scheme_gets_a_401(client: TestClient, authorization: str) -> None:
    response = client.get("/v1/models", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_opens_the_api(client: TestClient, key: str) -> None:
    assert client.get("/v1/models", headers=bearer(key)).status_code == 200
    assert client.post("/v1/chat/completions", json=CHAT, headers=bearer(key)).status_code == 200


def test_the_scheme_is_case_insensitive(client: TestClient) -> None:
    assert client.get("/v1/models", headers={"Authorization": "bearer sk-first"}).status_code == 200


def test_every_route_under_the_protected_prefixes_needs_the_key(fake: FakeGenerator) -> None:
    app = create_app(ServerSettings(api_keys=KEYS), generator=fake)
    protected = [
        (re.sub(r"\{[^}]*\}", "x", route.path), method)
        for route in app.routes
        if is_protected(route.path)
        for method in getattr(route, "methods", ())
        if method not in {"OPTIONS", "HEAD"}
    ]
    assert {path for path, _ in protected} >= {"/v1/models", "/v1/chat/completions", "/v1/completions"}
    with TestClient(app) as client:
        for path, method in protected:
            response = client.request(method, path, json={})
            assert response.status_code == 401, (method, path)


def test_health_metrics_and_docs_stay_open(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/docs/openapi.json").status_code == 200


def test_without_keys_the_api_is_open(fake: FakeGenerator) -> None:
    with TestClient(create_app(ServerSettings(), generator=fake)) as client:
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_the_openai_sdk_authenticates_with_its_api_key(live_url: str) -> None:
    good = openai.OpenAI(base_url=f"{live_url}/v1", api_key="sk-second", max_retries=0)
    assert good.models.list().data[0].id == "fake-model"
    bad = openai.OpenAI(base_url=f"{live_url}/v1", api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        bad.models.list()
    assert raised.value.code == "invalid_api_key"


def test_keys_are_checked_against_every_key_and_nothing_else() -> None:
    keys = APIKeys(("a", "ключ"))
    keys.check("Bearer a")
    keys.check("Bearer ключ")
    for wrong in (None, "", "Bearer", "Bearer ", "Bearer b", "Bearer ab", "Token a"):
        with pytest.raises(Exception, match="API key"):
            keys.check(wrong)


@pytest.mark.parametrize(
    ("path", "protected"),
    [
        ("/v1", True),
        ("/v1/models", True),
        ("/v1/chat/completions", True),
        ("/tokenize", True),
        ("/detokenize", True),
        ("/detokenize/x", True),
        ("/health", False),
        ("/metrics", False),
        ("/docs/openapi.json", False),
        ("/v10", False),
        ("/tokenizer", False),
    ],
)
def test_protection_goes_by_path_prefix(path: str, protected: bool) -> None:
    assert is_protected(path) is protected


def test_the_keys_never_show_in_the_settings_repr() -> None:
    assert "sk-first" not in repr(ServerSettings(api_keys=KEYS))


def test_keys_come_from_the_flag_and_the_environment() -> None:
    settings = parse_settings(
        ["--api-key", "one", "--api-key", "two"], environ={"HF_OPENAI_SERVER_API_KEY": " three, two ,,four"}
    )
    assert settings.api_keys == ("one", "two", "three", "four")
    assert parse_settings([], environ={}).api_keys == ()


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [
        ("0.0.0.0", (), True),
        ("192.168.1.20", (), True),
        ("::", (), True),
        ("example.org", (), True),
        ("0.0.0.0", ("k",), False),
        ("127.0.0.1", (), False),
        ("127.0.0.5", (), False),
        ("localhost", (), False),
        ("::1", (), False),
    ],
)
def test_an_open_server_off_loopback_is_a_warning(host: str, keys: tuple[str, ...], warned: bool) -> None:
    with structlog.testing.capture_logs() as logs:
        assert warn_if_exposed(ServerSettings(host=host, api_keys=keys)) is warned
    warnings = [entry for entry in logs if entry["log_level"] == "warning"]
    assert len(warnings) == int(warned)


def test_cors_is_off_by_default(client: TestClient) -> None:
    response = client.get("/health", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers


def test_an_allowed_origins_preflight_passes_without_a_key(fake: FakeGenerator) -> None:
    app = create_app(ServerSettings(api_keys=KEYS, cors_origins=(ORIGIN,)), generator=fake)
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
    }
    with TestClient(app) as client:
        response = client.options("/v1/chat/completions", headers=preflight)
        assert response.status_code in {200, 204}
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in response.headers["access-control-allow-headers"].lower()
        answered = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN, **bearer("sk-first")})
        assert answered.status_code == 200
        assert answered.headers["access-control-allow-origin"] == ORIGIN
        other = client.options("/v1/chat/completions", headers=preflight | {"Origin": "https://evil.example"})
        assert other.headers.get("access-control-allow-origin") != "https://evil.example"
