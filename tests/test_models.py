"""Many models in one server: names, load on demand, the budget, idle unloading (fake models, real registry)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from litestar.testing import TestClient

from entrypoints.bootstrap import Services, build_services
from entrypoints.http.app import create_app
from entrypoints.settings import ModelChoice, ServerSettings
from tests.fakes import FakeGenerator
from tests.live_server import serve

USER = [{"role": "user", "content": "Hello"}]
GIB = 2**30


class Loader:
    """Builds each model's services around a fake that answers with its own name; records loads and closes."""

    def __init__(self, *, memory_gib: float = 0.0) -> None:
        self.memory_gib = memory_gib
        self.loaded: list[str] = []
        self.closed: list[str] = []
        self.fakes: dict[str, FakeGenerator] = {}
        self.gates: dict[str, threading.Event] = {}
        self.failures: dict[str, int] = {}

    def __call__(self, settings: ServerSettings) -> Services:
        source = str(settings.model)
        if source in self.gates:
            assert self.gates[source].wait(timeout=30)
        if self.failures.get(source):
            self.failures[source] -= 1
            msg = f"{source} weights are corrupt"
            raise RuntimeError(msg)
        self.loaded.append(source)
        fake = self.fakes.setdefault(source, FakeGenerator(reply=f"I am {source}.", model_id=source))
        return build_services(
            settings, fake, close=lambda: self.closed.append(source), memory_bytes=int(self.memory_gib * GIB)
        )


def settings_for(*names: str, **options: object) -> ServerSettings:
    return ServerSettings(models=tuple(ModelChoice(name=name, source=name) for name in names), **options)


@pytest.fixture
def loader() -> Loader:
    return Loader()


def wait_until(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


def content(line: str) -> str:
    choices = json.loads(line.removeprefix("data: "))["choices"]
    return (choices[0]["delta"].get("content") or "") if choices else ""


def statuses(client: TestClient | httpx.Client) -> dict[str, str]:
    return {card["id"]: card["status"] for card in client.get("/v1/models").json()["data"]}


def ask(client: TestClient | httpx.Client, model: str) -> httpx.Response:
    return client.post("/v1/chat/completions", json={"model": model, "messages": USER})


@pytest.fixture
def three(loader: Loader) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for("alpha", "beta", "gamma"), loader=loader)) as client:
        wait_until(lambda: client.get("/health").status_code == 200)
        yield client


def test_every_model_is_listed_loaded_or_not(three: TestClient, loader: Loader) -> None:
    assert statuses(three) == {"alpha": "loaded", "beta": "unloaded", "gamma": "unloaded"}
    card = three.get("/v1/models/beta").json()
    assert (card["id"], card["object"], card["loaded"], card["status"]) == ("beta", "model", False, "unloaded")
    assert loader.loaded == ["alpha"]  # only the first model loads at start
    health = three.get("/health").json()
    assert health["models"] == {"alpha": "loaded", "beta": "unloaded", "gamma": "unloaded"}


def test_a_request_loads_its_model_and_gets_its_answer(three: TestClient, loader: Loader) -> None:
    body = ask(three, "beta").json()
    assert body["model"] == "beta"
    assert body["choices"][0]["message"]["content"] == "I am beta."
    assert ask(three, "alpha").json()["choices"][0]["message"]["content"] == "I am alpha."
    completion = three.post("/v1/completions", json={"model": "gamma", "prompt": "x"}).json()
    assert completion["model"] == "gamma"
    assert statuses(three) == {"alpha": "loaded", "beta": "loaded", "gamma": "loaded"}
    assert loader.loaded == ["alpha", "beta", "gamma"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/models/delta"])
def test_an_unknown_name_is_a_404_listing_what_is_served(three: TestClient, loader: Loader, path: str) -> None:
    body = {"model": "delta", "messages": USER, "prompt": "x", "max_tokens": 5}
    response = three.get(path) if path.startswith("/v1/models") else three.post(path, json=body)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert "delta" in error["message"]
    if path != "/v1/messages":  # Anthropic's envelope has no code
        assert error["code"] == "model_not_found"
        assert all(name in error["message"] for name in ("alpha", "beta", "gamma"))
    assert three.get("/health").status_code == 200
    assert loader.loaded == ["alpha"]
    assert ask(three, "alpha").status_code == 200


def test_a_single_model_still_answers_to_any_name(loader: Loader) -> None:
    with TestClient(create_app(settings_for("alpha"), loader=loader)) as client:
        wait_until(lambda: client.get("/health").status_code == 200)
        assert ask(client, "whatever").json()["model"] == "alpha"
        assert client.get("/v1/models/whatever").status_code == 404


def test_the_budget_unloads_the_least_recently_used_idle_model_never_a_streaming_one(loader: Loader) -> None:
    hold = threading.Event()
    loader.fakes["alpha"] = FakeGenerator(reply="I am alpha, streaming.", model_id="alpha", hold=hold)
    settings = settings_for("alpha", "beta", "gamma", max_loaded_models=2)
    with serve(create_app(settings, loader=loader)) as base, httpx.Client(base_url=base, timeout=30) as http:
        wait_until(lambda: http.get("/health").status_code == 200)
        body = {"model": "alpha", "messages": USER, "stream": True}
        with http.stream("POST", "/v1/chat/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            assert json.loads(first.removeprefix("data: "))["model"] == "alpha"
            assert ask(http, "beta").status_code == 200
            assert statuses(http) == {"alpha": "loaded", "beta": "loaded", "gamma": "unloaded"}
            assert ask(http, "gamma").json()["choices"][0]["message"]["content"] == "I am gamma."
            assert statuses(http) == {"alpha": "loaded", "beta": "unloaded", "gamma": "loaded"}
            assert loader.closed == ["beta"]
            hold.set()
            text = content(first) + "".join(content(line) for line in lines if line.startswith("data: {"))
        assert text == "I am alpha, streaming."
        assert ask(http, "beta").status_code == 200  # alpha finished streaming after gamma's last use: gamma goes
        assert statuses(http) == {"alpha": "loaded", "beta": "loaded", "gamma": "unloaded"}


def test_the_memory_budget_keeps_what_fits() -> None:
    loader = Loader(memory_gib=0.6)
    settings = settings_for("alpha", "beta", max_model_memory_gib=1.0)
    with TestClient(create_app(settings, loader=loader)) as client:
        wait_until(lambda: client.get("/health").status_code == 200)
        assert ask(client, "beta").status_code == 200
        assert statuses(client) == {"alpha": "unloaded", "beta": "loaded"}
        assert ask(client, "alpha").status_code == 200
        assert statuses(client) == {"alpha": "loaded", "beta": "unloaded"}
        assert loader.loaded == ["alpha", "beta", "alpha"]
        metrics = client.get("/metrics").text
        assert 'hf_openai_model_loaded{model="alpha"} 1.0' in metrics
        assert 'hf_openai_model_loaded{model="beta"} 0.0' in metrics
        assert 'hf_openai_model_requests_total{model="alpha"} 1.0' in metrics
        assert 'hf_openai_model_requests_total{model="beta"} 1.0' in metrics


def test_a_model_loading_never_holds_up_the_others(loader: Loader) -> None:
    loader.gates["beta"] = threading.Event()
    with (
        serve(create_app(settings_for("alpha", "beta"), loader=loader)) as base,
        httpx.Client(base_url=base, timeout=30) as http,
    ):
        wait_until(lambda: http.get("/health").status_code == 200)
        waiting: list[httpx.Response] = []
        thread = threading.Thread(target=lambda: waiting.append(ask(httpx.Client(base_url=base, timeout=30), "beta")))
        thread.start()
        wait_until(lambda: statuses(http)["beta"] == "loading")
        assert ask(http, "alpha").json()["choices"][0]["message"]["content"] == "I am alpha."
        assert http.get("/health").json()["models"] == {"alpha": "loaded", "beta": "loading"}
        assert not waiting
        loader.gates["beta"].set()
        thread.join(timeout=30)
        assert waiting[0].json()["choices"][0]["message"]["content"] == "I am beta."


def test_a_failed_load_is_a_503_and_the_next_request_tries_again(three: TestClient, loader: Loader) -> None:
    loader.failures["beta"] = 1
    refused = ask(three, "beta")
    assert refused.status_code == 503
    assert "beta weights are corrupt" in refused.json()["error"]["message"]
    assert statuses(three)["beta"] == "failed"
    assert ask(three, "alpha").status_code == 200
    assert ask(three, "beta").json()["choices"][0]["message"]["content"] == "I am beta."


def test_idle_models_are_unloaded_but_the_preloaded_one_stays(loader: Loader) -> None:
    settings = settings_for("alpha", "beta", model_idle_timeout=0.1)
    with TestClient(create_app(settings, loader=loader)) as client:
        wait_until(lambda: client.get("/health").status_code == 200)
        assert ask(client, "beta").status_code == 200
        wait_until(lambda: statuses(client)["beta"] == "unloaded")
        assert statuses(client)["alpha"] == "loaded"
        assert loader.closed == ["beta"]
        assert ask(client, "beta").status_code == 200  # and it loads again when asked for


def test_preload_names_the_models_loaded_at_start(loader: Loader) -> None:
    settings = settings_for("alpha", "beta", "gamma", preload=("beta", "gamma"))
    with TestClient(create_app(settings, loader=loader)) as client:
        wait_until(lambda: client.get("/health").status_code == 200)
        assert statuses(client) == {"alpha": "unloaded", "beta": "loaded", "gamma": "loaded"}
        assert ask(client, "alpha").status_code == 200
