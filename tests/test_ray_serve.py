"""The Ray Serve deployment for real: ``python -m entrypoints.ray`` with 2 replicas of a tiny model on local Ray.

Runs in ``nox -s ray`` (``pytest -m ray``; needs the ``[ray]`` extra). One deployment serves the whole module, in
order: the API, prefix-affine routing, a killed replica, then SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live_server import free_port
from tests.tiny_model import build_tiny_model

psutil = pytest.importorskip("psutil")
pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parent.parent
ENGINE_PROCESS = "ServeReplica:hf-openai-server:Engine"
START_TIMEOUT = 420.0
"""Seconds for Ray, Serve and two replicas to start on two busy cores."""
DEATH_BOUND = 60.0
"""Seconds within which requests on a killed replica must end: far below a drain grace, generous on busy cores."""
WORDS = ("apple", "river", "garden", "letter", "teacher", "robot", "morning", "song", "bread", "sky", "book", "bird")


@contextlib.contextmanager
def ray_server(model: Path, log_path: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m entrypoints.ray`` on ``model`` with 2 replicas; yields its URL once a replica serves."""
    port = free_port()
    command = [sys.executable, "-m", "entrypoints.ray", "--model", str(model), "--device", "cpu", "--replicas", "2"]
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [*command, "--port", str(port), "--log-format", "json", "--shutdown-timeout", "20", *flags],
            cwd=ROOT,
            stdout=log,
            stderr=log,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for(lambda: health(base) == 200 and replicas_running(base) == 2, START_TIMEOUT, process)
            yield base, process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    process.kill()


def wait_for(condition, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process is None or process.poll() is None, "the server exited"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def health(base: str) -> int:
    try:
        return httpx.get(f"{base}/health", timeout=5).status_code
    except httpx.HTTPError:
        return 0


def metrics(base: str) -> dict[str, float]:
    try:
        text = httpx.get(f"{base}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("hf_openai_"))
    return {name: float(value) for name, value in samples}


def replicas_running(base: str) -> int:
    return int(metrics(base).get("hf_openai_replicas_running", 0))


def engine_processes(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    """The engine replicas among the server's descendants (Ray's workers run under its raylet)."""
    found = []
    for child in psutil.Process(process.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if ENGINE_PROCESS in " ".join(child.cmdline()):
                found.append(child)
    return found


def system_prompt(conversation: int) -> str:
    """A long system prompt of a conversation's own (about 300 tokens of the tiny tokenizer)."""
    words = [WORDS[(conversation * 7 + i * (conversation + 3)) % len(WORDS)] for i in range(90)]
    return f"Conversation {conversation}. " + " ".join(words)


def chat(base: str, messages: list[dict[str, str]], **body: object) -> dict:
    answer = httpx.post(
        f"{base}/v1/chat/completions",
        json={"messages": messages, "max_tokens": 4, "temperature": 0, **body},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    return answer.json()


def stream_lines(base: str, body: dict, into: list[str], started: threading.Event) -> None:
    with (
        httpx.Client(timeout=300) as http,
        http.stream("POST", f"{base}/v1/completions", json=body) as response,
    ):
        for line in response.iter_lines():
            if line.startswith("data: "):
                into.append(line.removeprefix("data: "))
                started.set()
    started.set()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    model = build_tiny_model(tmp_path_factory.mktemp("tiny-ray"), context_length=2048)
    log_path = tmp_path_factory.mktemp("ray-logs") / "server.log"
    with ray_server(model, log_path) as (base, process):
        yield base, process, log_path


def test_the_api_answers_as_the_single_server_does(server) -> None:
    base, _, _ = server
    answer = chat(base, [{"role": "user", "content": "the cat eats an apple"}])
    assert answer["object"] == "chat.completion"
    assert answer["usage"]["completion_tokens"] == 4
    body = {"prompt": "the cat", "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    events = httpx.post(f"{base}/v1/completions", json=body, timeout=120).text.split("\n\n")
    assert events[-2] == "data: [DONE]"
    assert json.loads(events[-3].removeprefix("data: "))["usage"]["completion_tokens"] == 5
    tokens = httpx.post(f"{base}/tokenize", json={"prompt": "the cat"}, timeout=30).json()
    assert httpx.post(f"{base}/detokenize", json={"tokens": tokens["tokens"]}, timeout=30).json()["prompt"]
    scored = httpx.post(
        f"{base}/v1/completions", json={"prompt": "the cat", "echo": True, "logprobs": 1, "max_tokens": 0}, timeout=60
    ).json()
    assert scored["choices"][0]["logprobs"]["token_logprobs"][0] is None
    bad = httpx.post(f"{base}/v1/chat/completions", json={"messages": []}, timeout=30)
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"


def test_the_ingress_counts_the_draft_tokens_of_its_replicas(server) -> None:
    base, _, _ = server
    drafted, accepted = "hf_openai_spec_decode_draft_tokens_total", "hf_openai_spec_decode_accepted_tokens_total"
    before = metrics(base)[drafted]
    # one token's logit raised: the output repeats it, and prompt lookup drafts (and verifies) the repeats
    body = {"prompt": "the cat eats an apple", "max_tokens": 16, "temperature": 0, "logit_bias": {"85": 100}}
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=120).status_code == 200
    wait_for(lambda: metrics(base).get(drafted, 0) > before, 60)
    values = metrics(base)
    assert 0 <= values[accepted] <= values[drafted]


def test_repeated_conversations_hit_the_prefix_cache_of_their_replica(server) -> None:
    base, _, _ = server
    repeats, hits = 0, 0
    for conversation in range(8):
        messages = [{"role": "system", "content": system_prompt(conversation)}]
        for turn in range(4):
            messages.append({"role": "user", "content": f"turn {turn}: what about the {WORDS[turn]}?"})
            answer = chat(base, messages)
            messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
            if turn:
                repeats += 1
                hits += answer["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert hits / repeats >= 0.9, f"{hits} of {repeats} repeats hit the prefix cache"
    values = metrics(base)
    assert values['hf_openai_prefix_routing_total{outcome="hit"}'] >= 0.9 * repeats
    cache = [value for name, value in values.items() if name.startswith("hf_openai_replica_prefix_cache_bytes{")]
    assert len(cache) == 2


def test_streams_on_a_killed_replica_end_with_a_503_error_event(server) -> None:
    base, process, _ = server
    streams: list[list[str]] = [[], []]
    started = [threading.Event(), threading.Event()]
    threads = [
        threading.Thread(
            target=stream_lines,
            args=(base, {"prompt": f"story {i}", "max_tokens": 600, "ignore_eos": True, "stream": True}),
            kwargs={"into": streams[i], "started": started[i]},
        )
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    assert all(event.wait(300) for event in started)
    engine_processes(process)[0].kill()
    for thread in threads:
        thread.join(timeout=300)
        assert not thread.is_alive(), "a stream hung after its replica died"
    assert all(lines[-1] == "[DONE]" for lines in streams)
    errors = [end["error"] for end in (json.loads(lines[-2]) for lines in streams) if "error" in end]
    assert errors, "no stream was on the killed replica"
    assert all(error["code"] == "replica_unavailable" for error in errors), errors
    assert all(error["type"] == "service_unavailable" for error in errors)


def chat_in_thread(base: str, body: dict, into: list, started: threading.Event) -> None:
    """POST a chat request; ``into`` gets the stream's ``data:`` lines (or the JSON answer) and the seconds it ended."""
    with httpx.Client(timeout=600) as http:
        if body.get("stream"):
            with http.stream("POST", f"{base}/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        into.append(line.removeprefix("data: "))
                        started.set()
        else:
            started.set()
            response = http.post(f"{base}/v1/chat/completions", json=body)
            into.append((response.status_code, response.json()))
    into.append(time.monotonic())
    started.set()


def busiest(processes: list[psutil.Process], seconds: float = 2.0) -> psutil.Process:
    """The process that used the most CPU over ``seconds`` (the replica generating)."""
    before = [sum(p.cpu_times()[:2]) for p in processes]
    time.sleep(seconds)
    used = [sum(p.cpu_times()[:2]) - start for p, start in zip(processes, before, strict=True)]
    return processes[used.index(max(used))]


def test_n2_requests_on_a_killed_replica_end_promptly_with_a_503(server) -> None:
    base, process, _ = server
    wait_for(lambda: replicas_running(base) == 2 and len(engine_processes(process)) == 2, 300, process)
    system = {"role": "system", "content": system_prompt(42)}
    chat(base, [system, {"role": "user", "content": "warm the prefix"}])  # its replica now holds the prefix
    body = {"max_tokens": 1500, "ignore_eos": True, "n": 2, "temperature": 0.8}
    outcomes: list[list] = [[], []]
    started = [threading.Event(), threading.Event()]
    threads = [
        threading.Thread(
            target=chat_in_thread,
            args=(base, {"messages": [system, {"role": "user", "content": f"story {i}"}], **body, "stream": not i}),
            kwargs={"into": outcomes[i], "started": started[i]},
        )
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    assert all(event.wait(300) for event in started)
    wait_for(lambda: sum(v for k, v in metrics(base).items() if k.startswith("hf_openai_replica_running{")) == 4, 120)
    victim = busiest(engine_processes(process))
    victim.kill()
    killed = time.monotonic()
    late: list = []
    late_thread = threading.Thread(
        target=chat_in_thread,
        args=(base, {"messages": [system, {"role": "user", "content": "sent after the kill"}], "max_tokens": 4}),
        kwargs={"into": late, "started": threading.Event()},
    )
    late_thread.start()
    for thread in [*threads, late_thread]:
        thread.join(timeout=DEATH_BOUND + 30)
        assert not thread.is_alive(), "a request hung after its replica died"
    streamed, unary = outcomes
    assert streamed[-2] == "[DONE]"
    assert json.loads(streamed[-3])["error"]["code"] == "replica_unavailable", streamed[-3]
    status, answer = unary[0]
    assert status == 503, answer
    assert answer["error"]["code"] == "replica_unavailable"
    assert all(outcome[-1] - killed < DEATH_BOUND for outcome in outcomes), [o[-1] - killed for o in outcomes]
    assert late[-1] - killed < DEATH_BOUND
    assert late[0][0] in (200, 503), late[0]
    chat(base, [{"role": "user", "content": "after the n: 2 crash"}])


def test_a_killed_replica_is_replaced_and_later_requests_succeed(server) -> None:
    base, process, _ = server
    wait_for(lambda: replicas_running(base) == 2 and len(engine_processes(process)) == 2, 300, process)
    before = {name for name in metrics(base) if name.startswith("hf_openai_replica_running{")}
    victim = engine_processes(process)[0]
    victim.kill()
    victim.wait(timeout=30)
    for turn in range(3):
        chat(base, [{"role": "user", "content": f"after the crash {turn}"}])
    wait_for(
        lambda: (
            bool({name for name in metrics(base) if name.startswith("hf_openai_replica_running{")} - before)
            and replicas_running(base) == 2
        ),
        300,
        process,
    )
    chat(base, [{"role": "user", "content": "after the replacement"}])


def test_sigterm_drains_a_stream_then_leaves_no_ray_process_behind(server) -> None:
    base, process, log_path = server
    descendants = psutil.Process(process.pid).children(recursive=True)
    assert len(descendants) > 3, "Ray's processes were not found"
    lines: list[str] = []
    started = threading.Event()
    body = {"prompt": "a long story", "max_tokens": 100, "ignore_eos": True, "stream": True}
    reader = threading.Thread(target=stream_lines, args=(base, body), kwargs={"into": lines, "started": started})
    reader.start()
    assert started.wait(300)
    process.send_signal(signal.SIGTERM)
    reader.join(timeout=300)
    assert lines[-1] == "[DONE]"
    last = json.loads(lines[-2])
    assert "error" not in last, last
    assert process.wait(timeout=300) == 0
    _, alive = psutil.wait_procs(descendants, timeout=60)
    assert not alive, [(p.pid, p.name()) for p in alive]
    events = [json.loads(line)["event"] for line in log_path.read_text().splitlines() if line.startswith('{"')]
    assert "server.drained" in events
