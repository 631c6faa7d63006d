"""``/metrics``: Prometheus text with requests, tokens, latencies, load gauges and model load time, per app."""

from __future__ import annotations

import json
import threading
import time

import httpx
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from entrypoints.bootstrap import build_services
from entrypoints.http.app import create_app
from entrypoints.settings import ServerSettings
from tests.fakes import FakeGenerator

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def scrape(client: TestClient | httpx.Client, base: str = "") -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, keyed by name and sorted labels."""
    response = client.get(f"{base}/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_are_prometheus_text(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert names >= {
        "hf_openai_requests",
        "hf_openai_request_duration_seconds",
        "hf_openai_prompt_tokens",
        "hf_openai_prompt_tokens_cached",
        "hf_openai_completion_tokens",
        "hf_openai_time_to_first_token_seconds",
        "hf_openai_inter_token_latency_seconds",
        "hf_openai_requests_running",
        "hf_openai_requests_waiting",
        "hf_openai_model_load_seconds",
    }


def test_requests_are_counted_by_endpoint_method_and_status(client: TestClient) -> None:
    client.post("/v1/chat/completions", json=CHAT)
    client.post("/v1/chat/completions", json=CHAT)
    client.post("/v1/chat/completions", json={"messages": []})
    samples = scrape(client)
    chat = "/v1/chat/completions"
    assert value(samples, "hf_openai_requests_total", endpoint=chat, method="POST", status="200") == 2
    assert value(samples, "hf_openai_requests_total", endpoint=chat, method="POST", status="400") == 1
    assert value(samples, "hf_openai_request_duration_seconds_count", endpoint=chat) == 3


def test_refused_requests_are_counted_with_their_status(fake: FakeGenerator) -> None:
    with TestClient(create_app(ServerSettings(api_keys=("k",)), generator=fake)) as client:
        client.get("/v1/models")
        samples = scrape(client)
    assert value(samples, "hf_openai_requests_total", endpoint="/v1/models", method="GET", status="401") == 1


def test_tokens_add_up_to_the_usage_the_clients_got(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "abc"
    whole = client.post("/v1/completions", json={"prompt": "hello"}).json()["usage"]
    body = {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True}}
    events = [block for block in client.post("/v1/completions", json=body).text.split("\n\n") if "usage" in block]
    streamed = json.loads(events[-1].removeprefix("data: "))["usage"]
    samples = scrape(client)
    endpoint = "/v1/completions"
    prompt = value(samples, "hf_openai_prompt_tokens_total", endpoint=endpoint)
    completion = value(samples, "hf_openai_completion_tokens_total", endpoint=endpoint)
    assert prompt == whole["prompt_tokens"] + streamed["prompt_tokens"] == 7
    assert completion == whole["completion_tokens"] + streamed["completion_tokens"] == 8


def test_prefix_cache_hits_are_counted_as_the_clients_saw_them(client: TestClient, fake: FakeGenerator) -> None:
    fake.cached_tokens = 4
    try:
        usage = client.post("/v1/completions", json={"prompt": "hello there"}).json()["usage"]
    finally:
        fake.cached_tokens = 0
    assert usage["prompt_tokens_details"] == {"cached_tokens": 4}
    assert value(scrape(client), "hf_openai_prompt_tokens_cached_total", endpoint="/v1/completions") == 4


def test_first_token_and_inter_token_latencies_are_observed(client: TestClient, fake: FakeGenerator) -> None:
    fake.reply = "abcde"
    fake.step_delay = 0.01
    client.post("/v1/chat/completions", json=CHAT | {"stream": True})
    samples = scrape(client)
    endpoint = "/v1/chat/completions"
    assert value(samples, "hf_openai_time_to_first_token_seconds_count", endpoint=endpoint) == 1
    assert value(samples, "hf_openai_time_to_first_token_seconds_sum", endpoint=endpoint) >= 0.01
    gaps = value(samples, "hf_openai_inter_token_latency_seconds_count", endpoint=endpoint)
    assert gaps == 4  # five one-letter deltas
    assert value(samples, "hf_openai_inter_token_latency_seconds_sum", endpoint=endpoint) >= 0.03


def test_running_and_waiting_follow_a_generation(live_url: str, fake: FakeGenerator) -> None:
    fake.reply = "x" * 200
    fake.step_delay = 0.01
    body = CHAT | {"stream": True, "max_tokens": 200}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", f"{live_url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()  # kept: a discarded line iterator closes the connection
            next(line for line in lines if '"content": "x"' in line)
            during = scrape(http, live_url)
        deadline = time.monotonic() + 60  # it falls within a step of the disconnect; the bound only ends a failure
        after = scrape(http, live_url)
        while value(after, "hf_openai_requests_running") and time.monotonic() < deadline:
            time.sleep(0.02)
            after = scrape(http, live_url)
    assert value(during, "hf_openai_requests_running") == 1
    assert value(during, "hf_openai_requests_waiting") == 0
    assert value(after, "hf_openai_requests_running") == 0
    assert value(after, "hf_openai_requests_waiting") == 0
    assert fake.closed_early == 1


def test_a_request_waits_until_its_first_text(live_url: str, fake: FakeGenerator) -> None:
    fake.reply = "x" * 300
    fake.step_delay = 0.01
    body = CHAT | {"stream": True, "stop": "x" * 290}  # text that may start a stop sequence is held back
    with httpx.Client(timeout=30) as http:
        streaming = threading.Thread(target=lambda: http.post(f"{live_url}/v1/chat/completions", json=body))
        streaming.start()
        deadline = time.monotonic() + 10
        while fake.produced < 5:  # the request is generating: its text is held back, so it has none yet
            assert time.monotonic() < deadline, "the request never reached the model"
            time.sleep(0.01)
        during = scrape(http, live_url)
        streaming.join()
        after = scrape(http, live_url)
    assert value(during, "hf_openai_requests_waiting") == 1
    assert value(during, "hf_openai_requests_running") == 0
    assert value(after, "hf_openai_requests_waiting") == 0


def test_each_app_counts_for_itself(fake: FakeGenerator) -> None:
    with TestClient(create_app(ServerSettings(), generator=fake)) as first:
        first.get("/v1/models")
        with TestClient(create_app(ServerSettings(), generator=fake)) as second:
            samples = scrape(second)
    assert value(samples, "hf_openai_requests_total", endpoint="/v1/models", method="GET", status="200") == 0


def test_the_model_load_time_is_reported() -> None:
    def slow_loader(settings: ServerSettings):
        time.sleep(0.2)
        return build_services(settings, FakeGenerator())

    with TestClient(create_app(ServerSettings(), loader=slow_loader)) as client:
        deadline = time.monotonic() + 10
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert value(scrape(client), "hf_openai_model_load_seconds") >= 0.2
