"""The real server process on a tiny model: SIGTERM drains and exits 0; ``--no-log-content`` keeps content out."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live_server import free_port, wait_ready
from tests.tiny_model import build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
SECRET = "my-secret-prompt-4242"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@contextlib.contextmanager
def server_process(model: Path, log_path: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m entrypoints.http`` on ``model``, JSON logs into ``log_path``; yields its URL once it serves."""
    port = free_port()
    command = [sys.executable, "-m", "entrypoints.http", "--model", str(model), "--device", "cpu"]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*command, "--port", str(port), "--log-format", "json", *flags], cwd=ROOT, stdout=log, stderr=log
        )
        try:
            wait_ready(f"http://127.0.0.1:{port}", timeout=120)
            yield f"http://127.0.0.1:{port}", process
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def records(log_path: Path) -> list[dict]:
    return [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]


def refused(base: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base}/health", timeout=0.5)
        except httpx.ConnectError:
            return True
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    return False


def test_sigterm_ends_a_long_stream_cleanly_and_exits_0(tiny_model: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    body = {"prompt": "Once upon a time", "max_tokens": 230, "min_new_tokens": 230, "stream": True}
    with (
        server_process(tiny_model, log_path, "--shutdown-timeout", "0.1") as (base, process),
        httpx.Client(timeout=30) as http,
        http.stream("POST", f"{base}/v1/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        next(line for line in lines if line.startswith('data: {"id"'))
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert refused(base, within=10.0), "new connections were still accepted after SIGTERM"
        events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        ended = time.monotonic() - signalled
        assert process.wait(timeout=15) == 0
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    if "error" in last:
        assert last["error"]["code"] == "server_shutting_down"
        assert ended < 30  # the grace is 0.1 s; generous for a busy machine, far below the 230 tokens' own time
    else:
        assert last["choices"][0]["finish_reason"] == "length"
    names = [record["event"] for record in records(log_path)]
    assert "server.draining" in names


def test_no_log_content_keeps_content_out_of_a_real_servers_log(tiny_model: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "server.log"
    with server_process(tiny_model, log_path, "--no-log-content") as (base, process):
        body = {"messages": [{"role": "user", "content": SECRET}], "max_tokens": 12, "temperature": 0}
        answer = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30).json()
        stream = {"prompt": SECRET, "max_tokens": 12, "stream": True}
        httpx.post(f"{base}/v1/completions", json=stream, timeout=30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    text = log_path.read_text()
    logged = records(log_path)
    assert SECRET not in text
    assert not any({"prompt", "input_ids", "generated_ids", "raw_text", "response", "content"} & set(r) for r in logged)
    if len(answer["choices"][0]["message"]["content"]) >= 8:
        assert answer["choices"][0]["message"]["content"] not in text
    usage = [r for r in logged if r["event"] == "usage"]
    assert len(usage) == 2
    assert usage[0]["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert usage[0]["completion_tokens"] == answer["usage"]["completion_tokens"]
