"""Slow checks on the embedded SmolLM2-135M-Instruct: serve it as a user would, answer through the OpenAI SDK."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.live_server import free_port, wait_ready

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CACHES: list[Path] = []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    cache = tmp_path_factory.mktemp("cache")
    CACHES.append(cache)
    log = (tmp_path_factory.mktemp("logs") / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.http", "--port", str(port), "--cache-dir", str(cache)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, timeout=300)
        yield base
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_serves_the_embedded_model_with_no_arguments(server: str) -> None:
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["SmolLM2-135M-Instruct"]
    answer = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        # The embedded file's 4 bits answer "What is the capital of France?" with "L'Étoile, la Marseillaise..." in
        # llama.cpp as here (both checked on 2026-12-07); asked this way both answer "The capital of France is Paris."
        messages=[{"role": "user", "content": "Name the capital of France."}],
        max_tokens=30,
        temperature=0,
    )
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.choices[0].finish_reason == "stop"


def test_streams_and_stops_on_a_multi_token_sequence(server: str) -> None:
    """A streamed answer is the answer, token for token.

    Both requests find the prompt's blocks in the prefix cache, put there by a first one: an int8 prefill of fewer
    uncached positions can round otherwise and answer otherwise (README, "Quantized weights").
    """
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "List three fruits."}], max_tokens=1, temperature=0
    )
    whole = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "List three fruits."}], max_tokens=40, temperature=0
    )
    text = whole.choices[0].message.content or ""
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "List three fruits."}],
        max_tokens=40,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_warm_start_loads_the_snapshot_and_answers(server: str) -> None:
    """A second server on the same cache loads the converted snapshot: ready and answering in seconds."""
    del server  # the module's server converted the GGUF into the cache already
    cache = next(iter(CACHES))
    port = free_port()
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "entrypoints.http", "--port", str(port), "--cache-dir", str(cache)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_ready(base, timeout=120)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        client.completions.create(model="m", prompt="Hello", max_tokens=1)
        elapsed = time.monotonic() - started
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(f"warm start to first answer: {elapsed:.1f} s")  # noqa: T201  a figure for the README
    assert elapsed < 60
