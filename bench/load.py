"""Load check on loopback: many concurrent requests, mixed streaming and not, some clients leaving mid-stream.

Two rounds, each against a server process of its own: the fake generator (``FakeGenerator`` from the tests, served
by this script's ``serve-fake`` subcommand) and a tiny random Llama served by ``python -m entrypoints.http``. Each
round reports requests by outcome, HTTP statuses, latency percentiles and the server's RSS before and after, and
fails (exit 1) on a lost request (no answer, or a stream cut short by the server), a 5xx, an error event, a
generation still running afterwards (``/metrics`` gauges), or RSS that did not come back near its baseline.

    python bench/load.py                                   # 500 requests on the fake, 100 on the tiny model
    python bench/load.py --fake-requests 2000 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024
RSS_SLACK_MIB = 64.0
"""How far above its warmed-up baseline the server's RSS may stay once the load is over."""
CHAT_PROMPT = [{"role": "user", "content": "Tell me about the sea, the ships and the people on them."}]


@dataclass
class Tally:
    """What the clients saw in one round."""

    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server(command: list[str], port: int) -> Iterator[psutil.Process]:
    """Start ``command``; yield its process once ``/health`` answers 200; SIGTERM it at the end."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                _, err = process.communicate(timeout=5)
                sys.exit(f"the server did not start:\n{err.decode()[-2000:]}")
            time.sleep(0.1)
        yield psutil.Process(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        print(f"  server exit code after SIGTERM: {code}")


def body_for(index: int) -> tuple[str, dict[str, object], bool, bool]:
    """Path, body, whether it streams, and whether the client leaves mid-stream; a fixed mix by index."""
    stream = index % 2 == 1
    leaves = stream and index % 10 in {3, 7}
    if index % 4 in {0, 1}:
        return "/v1/chat/completions", {"messages": CHAT_PROMPT, "max_tokens": 32, "stream": stream}, stream, leaves
    return "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 32, "stream": stream}, stream, leaves


async def one(http: httpx.AsyncClient, base: str, index: int, tally: Tally) -> None:
    """Send request ``index`` and record how it went."""
    path, body, stream, leaves = body_for(index)
    started = time.monotonic()
    try:
        if not stream:
            response = await http.post(f"{base}{path}", json=body)
            tally.statuses[response.status_code] += 1
            ok = response.status_code == 200 and bool(response.json()["choices"])
            tally.outcomes["whole" if ok else "failed"] += 1
            if not ok:
                tally.problems.append(f"{path}: {response.status_code} {response.text[:200]}")
        else:
            async with http.stream("POST", f"{base}{path}", json=body) as response:
                tally.statuses[response.status_code] += 1
                events = []
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line.removeprefix("data: "))
                        if leaves and len(events) >= 2:
                            tally.outcomes["left mid-stream"] += 1
                            return
                errors = [e for e in events if e != "[DONE]" and "error" in json.loads(e)]
                if not events or events[-1] != "[DONE]" or errors:
                    tally.outcomes["failed"] += 1
                    tally.problems.append(f"{path} stream: {(errors or events[-1:] or ['nothing'])[0][:200]}")
                else:
                    tally.outcomes["streamed"] += 1
    except (httpx.HTTPError, ValueError, KeyError) as error:
        tally.outcomes["lost"] += 1
        tally.problems.append(f"{path}: {type(error).__name__}: {error}")
    finally:
        tally.latencies.append(time.monotonic() - started)


async def load(base: str, requests: int, concurrency: int, tally: Tally) -> float:
    """Send ``requests`` requests, ``concurrency`` at a time; return the wall time."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=120, limits=limits) as http:

        async def gated(index: int) -> None:
            async with gate:
                await one(http, base, index, tally)

        started = time.monotonic()
        await asyncio.gather(*(gated(i) for i in range(requests)))
        return time.monotonic() - started


def gauges(base: str) -> dict[str, float]:
    """The server's running and waiting gauges."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    wanted = ("hf_openai_requests_running", "hf_openai_requests_waiting")
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith(wanted)}


def settle(base: str, timeout: float = 10) -> dict[str, float]:
    """Wait until no generation runs or waits (disconnected ones must stop); return the last gauges."""
    deadline = time.monotonic() + timeout
    values = gauges(base)
    while any(values.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
        values = gauges(base)
    return values


@contextlib.contextmanager
def peak_rss(process: psutil.Process) -> Iterator[list[float]]:
    """Sample ``process``'s RSS every 50 ms while the block runs; the list holds the peak in MiB."""
    peak = [process.memory_info().rss / MIB]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], process.memory_info().rss / MIB)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


def run_round(name: str, command: list[str], port: int, requests: int, concurrency: int) -> bool:
    """One round against one server; print its figures; return whether it passed."""
    base = f"http://127.0.0.1:{port}"
    print(f"\n== {name}: {requests} requests, concurrency {concurrency}")
    with server(command, port) as process:
        asyncio.run(load(base, concurrency * 2, concurrency, Tally()))  # warm-up: lazy imports, caches, pools
        settle(base)
        baseline = process.memory_info().rss / MIB
        tally = Tally()
        with peak_rss(process) as peak:
            wall = asyncio.run(load(base, requests, concurrency, tally))
        left = settle(base)
        time.sleep(1.0)
        after = process.memory_info().rss / MIB
    latencies = sorted(tally.latencies)
    p50, p95 = statistics.median(latencies), latencies[int(0.95 * (len(latencies) - 1))]
    five_xx = sum(count for status, count in tally.statuses.items() if status >= 500)
    print(f"  wall {wall:.1f} s, {requests / wall:.0f} req/s, latency p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
    print(f"  outcomes {dict(tally.outcomes)}")
    print(f"  statuses {dict(tally.statuses)}  (5xx: {five_xx})")
    print(f"  gauges after {left}")
    print(
        f"  server RSS {baseline:.0f} MiB before, {peak[0]:.0f} MiB peak, {after:.0f} MiB after"
        f" ({after - baseline:+.0f} MiB)"
    )
    for problem in tally.problems[:10]:
        print(f"  ! {problem}")
    passed = (
        sum(tally.outcomes.values()) == requests
        and tally.outcomes["lost"] == 0
        and tally.outcomes["failed"] == 0
        and five_xx == 0
        and not any(left.values())
        and after - baseline <= RSS_SLACK_MIB
    )
    print(f"  {'PASS' if passed else 'FAIL'}")
    return passed


def serve_fake(port: int) -> None:
    """Serve the fake generator on loopback (the ``serve-fake`` subcommand)."""
    import uvicorn  # noqa: PLC0415  only the server process needs these

    from entrypoints.http.app import create_app  # noqa: PLC0415
    from entrypoints.http.lifecycle import Drain, DrainingServer  # noqa: PLC0415
    from entrypoints.logs import configure_logging  # noqa: PLC0415
    from entrypoints.settings import ServerSettings  # noqa: PLC0415
    from tests.fakes import FakeGenerator  # noqa: PLC0415

    configure_logging("WARNING", log_format="json")
    reply = "The sea is wide and the ships are many; sailors sing as they work. " * 2
    drain = Drain(grace=5)
    fake = FakeGenerator(reply=reply, step_delay=0.001)
    app = create_app(ServerSettings(log_level="WARNING"), generator=fake, drain=drain)
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    DrainingServer(config, drain).run()


def main() -> int:
    """Run the rounds asked for; 0 when all passed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fake-requests", type=int, default=500)
    parser.add_argument("--model-requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("command", nargs="?", choices=["serve-fake"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.command == "serve-fake":
        serve_fake(args.port)
        return 0
    passed = []
    if args.fake_requests:
        port = free_port()
        command = [sys.executable, __file__, "serve-fake", "--port", str(port)]
        passed.append(run_round("fake generator", command, port, args.fake_requests, args.concurrency))
    if args.model_requests:
        from tests.tiny_model import build_tiny_model  # noqa: PLC0415  torch loads only for this round

        with tempfile.TemporaryDirectory() as directory:
            model = build_tiny_model(Path(directory) / "tiny")
            port = free_port()
            command = [sys.executable, "-m", "entrypoints.http", "--model", str(model), "--device", "cpu"]
            command += ["--port", str(port), "--log-level", "WARNING"]
            passed.append(run_round("tiny Llama", command, port, args.model_requests, args.concurrency))
    return 0 if all(passed) else 1


if __name__ == "__main__":
    sys.exit(main())
