"""Prefix routing and throughput of ``python -m entrypoints.ray`` on this machine, side by side in one run.

For each configuration (1 replica; 2 replicas routed by prefix; 2 replicas routed to the least loaded, ties at
random) a fresh server serves conversations that each have a long system prompt of their own:

- hit rate: conversations one after another, each for several turns; a repeat (every turn after the first) hits
  when ``usage.prompt_tokens_details.cached_tokens > 0``; also the share of repeat prompt tokens read from the cache;
- throughput: ``--clients`` clients at once, each running conversations of its own; requests/s over the run.

    python bench/ray_routing.py                      # the embedded SmolLM2-135M-Instruct
    python bench/ray_routing.py --model DIR --conversations 8 --turns 4
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("apple", "river", "garden", "letter", "teacher", "robot", "morning", "song", "bread", "sky", "book", "bird")
CONFIGS = (
    ("1 replica", 1, "prefix"),
    ("2 replicas, prefix", 2, "prefix"),
    ("2 replicas, least-loaded", 2, "least-loaded"),
)


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_name() -> str:
    """The CPU's model name, for the figures."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def system_prompt(conversation: int, words: int) -> str:
    """A long system prompt of a conversation's own."""
    chosen = [WORDS[(conversation * 7 + i * (conversation + 3)) % len(WORDS)] for i in range(words)]
    return f"You are assistant number {conversation}. Remember these words: " + " ".join(chosen)


@contextlib.contextmanager
def server(model: str | None, replicas: int, routing: str, log: Path) -> Iterator[str]:
    """``python -m entrypoints.ray`` until the block ends; yields its URL once every replica runs."""
    port = free_port()
    command = [sys.executable, "-m", "entrypoints.ray", "--replicas", str(replicas), "--routing", routing]
    command += ["--port", str(port), "--log-format", "json", *(["--model", model] if model else [])]
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=out)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 900
            while not ready(base, replicas):
                if process.poll() is not None or time.monotonic() > deadline:
                    msg = f"the server did not start: see {log}"
                    raise RuntimeError(msg)
                time.sleep(1)
            yield base
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                process.kill()


def ready(base: str, replicas: int) -> bool:
    """``/health`` is 200 and ``replicas`` replicas run."""
    try:
        if httpx.get(f"{base}/health", timeout=5).status_code != 200:
            return False
        text = httpx.get(f"{base}/metrics", timeout=5).text
    except httpx.HTTPError:
        return False
    return f"hf_openai_replicas_running {float(replicas)}" in text


def chat(http: httpx.Client, base: str, messages: list[dict[str, str]], max_tokens: int) -> dict:
    """One greedy chat completion."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0}
    answer = http.post(f"{base}/v1/chat/completions", json=body, timeout=600)
    answer.raise_for_status()
    return answer.json()


def conversation(base: str, number: int, turns: int, words: int, max_tokens: int) -> list[dict]:
    """Usage of each turn of one conversation."""
    usages = []
    messages = [{"role": "system", "content": system_prompt(number, words)}]
    with httpx.Client() as http:
        for turn in range(turns):
            messages.append({"role": "user", "content": f"Turn {turn}: tell me about the {WORDS[turn % len(WORDS)]}."})
            answer = chat(http, base, messages, max_tokens)
            messages.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
            usages.append(answer["usage"])
    return usages


def measure(base: str, args: argparse.Namespace) -> dict[str, float]:
    """Hit rate (conversations one after another), then requests/s (``--clients`` at once)."""
    repeats = [
        usage
        for number in range(args.conversations)
        for usage in conversation(base, number, args.turns, args.words, args.max_tokens)[1:]
    ]
    hits = sum(usage["prompt_tokens_details"]["cached_tokens"] > 0 for usage in repeats)
    cached = sum(usage["prompt_tokens_details"]["cached_tokens"] for usage in repeats)
    prompt = sum(usage["prompt_tokens"] for usage in repeats)
    offset = 1000  # conversations the hit-rate round never saw
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        runs = [
            pool.submit(conversation, base, offset + number, args.turns, args.words, args.max_tokens)
            for number in range(args.clients * args.rounds)
        ]
        requests = sum(len(run.result()) for run in runs)
    seconds = time.perf_counter() - started
    return {
        "hit_rate": hits / len(repeats),
        "cached_share": cached / prompt,
        "requests_per_second": requests / seconds,
        "requests": requests,
    }


def main() -> int:
    """Every configuration in turn; a Markdown table at the end."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--words", type=int, default=120, help="words in each system prompt")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="conversations per client in the throughput run")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; model: {args.model or 'embedded SmolLM2-135M-Instruct'}")
    rows = []
    with tempfile.TemporaryDirectory() as logs:
        for name, replicas, routing in CONFIGS:
            with server(args.model, replicas, routing, Path(logs) / f"{replicas}-{routing}.log") as base:
                chat(httpx.Client(), base, [{"role": "user", "content": "warm up"}], 4)
                rows.append((name, measure(base, args)))
                print(name, rows[-1][1], flush=True)
    print("\n| configuration | repeats hitting the cache | repeat prompt tokens cached | requests/s |")
    print("| --- | --- | --- | --- |")
    for name, row in rows:
        print(
            f"| {name} | {row['hit_rate']:.0%} | {row['cached_share']:.0%} | {row['requests_per_second']:.2f} "
            f"({row['requests']:.0f} requests) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
