"""Throughput of this server against llama.cpp and ``transformers serve``, side by side on the same model and machine.

Starts every server on the embedded SmolLM2: ours in float32, int8 and int4 (``--quantize``; ours converts its GGUF
into the snapshot cache once), ``transformers serve`` pointed at that snapshot directory (it cannot download), and
llama.cpp's ``llama-server`` (built once from source, see ``bench/llama_cpp.py``) on f32 and q8_0 GGUFs converted
from the snapshot and on the embedded q4_1 file itself. Then it sends streaming chat requests from a fixed prompt
set at each concurrency, a fixed number of requests per cell, in rounds that alternate the servers, and reports:
aggregate completion tok/s, median per-stream decode tok/s, time to first token p50/p95, errors, peak RSS of the
server process, and the ratios of like to like (float32 to f32, int8 to q8_0, int4 to q4_1, ours to theirs).

    python bench/throughput.py                         # 1, 4 and 16 concurrent streams, every server
    python bench/throughput.py --only int8 q8_0        # a subset (substring match on the names)
    python bench/throughput.py --readme README.md      # and write the table into README's Performance section
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle works, part by part, for a curious ten-year-old.",
    "Describe a busy market in the morning: the sounds, the smells and the people.",
    "Give me a detailed recipe for a vegetable soup, with every step.",
    "Tell me about the history of the printing press and why it mattered.",
    "Write a letter to a friend describing your last holiday by the sea.",
    "Explain what a computer does when you press a key on the keyboard.",
    "Describe the life cycle of a butterfly, stage by stage.",
)
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"


@dataclass
class Server:
    """How to start one server and what it calls its model."""

    name: str
    command: list[str]
    port: int
    model: str
    ready_path: str = "/health"
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Sample:
    """One streamed request, as the client saw it."""

    ttft: float | None = None
    duration: float = 0.0
    decode_seconds: float = 0.0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Round:
    """One pass of a cell's requests."""

    samples: list[Sample]
    wall: float
    peak_rss_mib: float | None

    @property
    def aggregate(self) -> float:
        """Completion tokens per second of wall time."""
        tokens = sum(s.completion_tokens for s in self.samples if s.error is None)
        return tokens / self.wall if self.wall else 0.0


@dataclass
class Cell:
    """One server at one concurrency, over every round: medians of rounds, percentiles of pooled samples."""

    server: str
    concurrency: int
    rounds: list[Round] = field(default_factory=list)

    @property
    def samples(self) -> list[Sample]:
        """Every request of every round."""
        return [s for r in self.rounds for s in r.samples]

    @property
    def ok(self) -> list[Sample]:
        """The requests that succeeded."""
        return [s for s in self.samples if s.error is None]

    @property
    def errors(self) -> int:
        """How many requests failed."""
        return len(self.samples) - len(self.ok)

    @property
    def aggregate(self) -> float:
        """Median over rounds of completion tokens per second."""
        return statistics.median(r.aggregate for r in self.rounds) if self.rounds else 0.0

    @property
    def peak_rss_mib(self) -> float | None:
        """Highest resident memory of the server during the cell."""
        peaks = [r.peak_rss_mib for r in self.rounds if r.peak_rss_mib]
        return max(peaks) if peaks else None

    @property
    def per_stream(self) -> float:
        """Median decode rate of one stream, after its first token."""
        rates = [(s.completion_tokens - 1) / s.decode_seconds for s in self.ok if s.decode_seconds > 0]
        return statistics.median(rates) if rates else 0.0

    def ttft(self, quantile: float) -> float:
        """Time to first token at ``quantile`` (nearest rank)."""
        values = sorted(s.ttft for s in self.ok if s.ttft is not None)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, round(quantile * (len(values) - 1)))]


def snapshot_dir(cache_dir: Path) -> Path:
    """Convert the embedded GGUF into the snapshot cache (once) and return the snapshot directory."""
    sys.path.insert(0, str(ROOT))
    from adapters.huggingface.loading import default_model_path, gguf_snapshot  # noqa: PLC0415

    return gguf_snapshot(default_model_path(), cache_dir)


QUANTIZED = (("fp32", "none"), ("int8", "int8"), ("int4", "int4"))
"""Our rows: the name's suffix and the ``--quantize`` value."""
LLAMA_CPP_FILES = ("f32", "q8_0", "q4_1")
RATIOS = (
    ("hf-openai-server fp32", "llama.cpp f32"),
    ("hf-openai-server int8", "llama.cpp q8_0"),
    ("hf-openai-server int4", "llama.cpp q4_1"),
    ("hf-openai-server int8", "llama.cpp q4_1"),
    ("hf-openai-server fp32", "transformers serve"),
    ("hf-openai-server fp32", "transformers serve --continuous-batching"),
)
"""(ours, theirs) pairs the ratio table compares, like to like."""
AVX2_ENVIRONMENT = {"HF_OPENAI_SERVER_NATIVE": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
"""``--avx2``: our kernels' AVX2 build, torch's and oneDNN's AVX2 code (for ours and ``transformers serve``)."""
AVX2_NOTE = "; held to AVX2 (--avx2): ours on its AVX2 build, torch and oneDNN at AVX2, llama.cpp built for AVX2"


def servers(args: argparse.Namespace, snapshot: Path) -> list[Server]:
    """Ours in float32, int8 and int4; ``transformers serve`` without and with continuous batching; llama.cpp."""
    python = sys.executable
    transformers_cli = str(Path(python).with_name("transformers"))
    ours_flags = [
        "--device",
        "cpu",
        "--max-batch-size",
        str(args.max_batch_size),
        "--log-level",
        "WARNING",
        "--cache-dir",
        str(args.cache_dir),
        *(["--threads", str(args.threads)] if args.threads else []),
        *(["--prefix-cache-mib", str(args.prefix_cache_mib)] if args.prefix_cache_mib is not None else []),
    ]
    ours = [
        Server(
            f"hf-openai-server {suffix}",
            [python, "-m", "entrypoints.http", "--port", str(args.port + i), "--quantize", scheme, *ours_flags],
            args.port + i,
            "SmolLM2-135M-Instruct",
            env=AVX2_ENVIRONMENT if args.avx2 else {},
        )
        for i, (suffix, scheme) in enumerate(QUANTIZED)
    ]
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if args.avx2:
        offline |= AVX2_ENVIRONMENT

    def theirs(port: int) -> list[str]:
        command = [transformers_cli, "serve", str(snapshot), "--port", str(port), "--device", "cpu"]
        return [*command, "--dtype", "auto", "--log-level", "warning"]

    port = args.port + len(ours)
    transformers_servers = [
        Server("transformers serve", theirs(port), port, str(snapshot), env=offline),
        Server(
            "transformers serve --continuous-batching",
            [*theirs(port + 1), "--continuous-batching"],
            port + 1,
            str(snapshot),
            env=offline,
        ),
    ]
    return [*ours, *transformers_servers, *llama_cpp_servers(args, snapshot, port + 2)]


def llama_cpp_servers(args: argparse.Namespace, snapshot: Path, port: int) -> list[Server]:
    """``llama-server`` on f32 and q8_0 GGUFs of the snapshot and on the embedded q4_1 file (built once)."""
    if args.no_llama_cpp:
        return []
    import llama_cpp  # noqa: PLC0415  the bench's own helper, beside this file

    from adapters.huggingface.loading import default_model_path  # noqa: PLC0415

    binary = llama_cpp.llama_server(avx2=args.avx2)
    files = {"q4_1": default_model_path()} | {
        outtype: llama_cpp.converted_gguf(snapshot, outtype) for outtype in ("f32", "q8_0")
    }
    threads, context = str(os.cpu_count()), str(args.max_batch_size * 1024)
    flags = ["-np", str(args.max_batch_size), "-t", threads, "-c", context, *args.llama_cpp_flag]
    return [
        Server(
            f"llama.cpp {name}",
            [str(binary), "-m", str(files[name]), "--port", str(port + i), *flags, "--log-disable"],
            port + i,
            "SmolLM2-135M-Instruct",
        )
        for i, name in enumerate(LLAMA_CPP_FILES)
    ]


@contextlib.contextmanager
def running(server: Server, timeout: float) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``server``, wait until it answers, and stop it afterwards."""
    log = Path(os.environ.get("BENCH_LOG_DIR", "/tmp")) / f"bench-{server.port}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            server.command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, env=os.environ | server.env
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                msg = f"{server.name} exited with {process.returncode}; see {log}"
                raise RuntimeError(msg)
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{server.port}{server.ready_path}", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                msg = f"{server.name} was not ready within {timeout:.0f} s; see {log}"
                raise RuntimeError(msg)
            time.sleep(0.5)
        yield process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def stream_one(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int) -> Sample:
    """One streaming chat request; completion tokens from the usage chunk (else one per content chunk).

    A request whose kept-alive connection the server had closed (``RemoteProtocolError`` before any answer; llama.cpp's
    server does this now and then) is sent once more on a new connection, as the OpenAI SDK retries it.
    """
    sample = await _stream_once(client, server, prompt, max_tokens)
    if sample.error is not None and sample.error.startswith("RemoteProtocolError") and sample.ttft is None:
        sample = await _stream_once(client, server, prompt, max_tokens)
    return sample


async def _stream_once(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int) -> Sample:
    """`stream_one`'s request, sent once."""
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sample = Sample()
    started = time.perf_counter()
    first = last = None
    chunks = 0
    try:
        async with client.stream("POST", f"http://127.0.0.1:{server.port}/v1/chat/completions", json=body) as reply:
            if reply.status_code != 200:
                sample.error = f"HTTP {reply.status_code}"
                return sample
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                if "error" in event:
                    sample.error = str(event["error"].get("message"))
                    break
                if event.get("usage"):
                    sample.completion_tokens = int(event["usage"]["completion_tokens"])
                for choice in event.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        chunks += 1
    except httpx.HTTPError as error:
        sample.error = f"{type(error).__name__}: {error}"
    sample.duration = time.perf_counter() - started
    if first is not None and last is not None:
        sample.ttft = first - started
        sample.decode_seconds = last - first
    sample.completion_tokens = sample.completion_tokens or chunks
    return sample


async def run_cell(server: Server, concurrency: int, requests: int, max_tokens: int) -> tuple[list[Sample], float]:
    """``requests`` requests, ``concurrency`` at a time, prompts in a fixed rotation."""
    queue = list(range(requests))
    samples: list[Sample] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:

        async def worker() -> None:
            while queue:
                index = queue.pop(0)
                samples.append(await stream_one(client, server, PROMPTS[index % len(PROMPTS)], max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return samples, time.perf_counter() - started


def reset_peak_rss(pid: int) -> None:
    """Reset the kernel's peak-RSS mark (``VmHWM``) so each cell reports its own peak."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mib(pid: int) -> float | None:
    """``VmHWM`` of the process and its children, in MiB (Linux only)."""
    total = 0.0
    pids = [pid, *_children(pid)]
    for one in pids:
        with contextlib.suppress(OSError):
            match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{one}/status").read_text())
            if match:
                total += int(match.group(1)) / 1024
    return total or None


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def bench(selected: Sequence[Server], args: argparse.Namespace) -> list[Cell]:
    """Every server up at once; per concurrency, rounds in which each server runs the cell in turn.

    Interleaving rounds spreads the load of a shared machine evenly over the servers being compared.
    """
    cells = {(server.name, c): Cell(server.name, c) for server in selected for c in args.concurrency}
    with contextlib.ExitStack() as stack:
        processes = {server.name: stack.enter_context(running(server, args.start_timeout)) for server in selected}
        for server in selected:
            asyncio.run(run_cell(server, 1, args.warmup, args.max_tokens))
        for concurrency in args.concurrency:
            requests = args.requests or max(4, 2 * concurrency)
            for round_index in range(args.rounds):
                shift = round_index % len(selected)
                for server in [*selected[shift:], *selected[:shift]]:
                    pid = processes[server.name].pid
                    reset_peak_rss(pid)
                    samples, wall = asyncio.run(run_cell(server, concurrency, requests, args.max_tokens))
                    done = Round(samples, wall, peak_rss_mib(pid))
                    cells[server.name, concurrency].rounds.append(done)
                    failures = [s.error for s in samples if s.error is not None]
                    print(
                        f"c={concurrency:<3} round {round_index} {server.name:42s} n={requests:<3} "
                        f"{done.aggregate:7.1f} tok/s  errors {len(failures)}  ({wall:.1f} s)"
                        + (f"  first error: {failures[0][:200]}" if failures else ""),
                        flush=True,
                    )
    return list(cells.values())


def machine() -> str:
    """CPU model and its kernel-deciding features, cores, torch and transformers versions."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    from adapters.huggingface.cpu_features import describe_cpu  # noqa: PLC0415

    return (
        f"{describe_cpu()}, {os.cpu_count()} cores, {platform.system()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )


def table(cells: Sequence[Cell], args: argparse.Namespace) -> str:
    """The Markdown table: every cell, and the ratios of the `RATIOS` pairs."""
    by_key = {(c.server, c.concurrency): c for c in cells}
    names = list(dict.fromkeys(c.server for c in cells))
    header = (
        "| server | concurrency | requests | aggregate tok/s | per-stream tok/s | TTFT p50 | TTFT p95 "
        "| errors | peak RSS |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        for concurrency in args.concurrency:
            cell = by_key.get((name, concurrency))
            if cell is None:
                continue
            rss = f"{cell.peak_rss_mib:.0f} MiB" if cell.peak_rss_mib else "n/a"
            lines.append(
                f"| {name} | {concurrency} | {len(cell.samples)} | {cell.aggregate:.1f} | {cell.per_stream:.1f} "
                f"| {cell.ttft(0.5):.2f} s | {cell.ttft(0.95):.2f} s | {cell.errors} | {rss} |"
            )
    lines += ["", "| ratio (ours / theirs) | concurrency | aggregate | per-stream | TTFT p50 (theirs / ours) |"]
    lines.append("|---|---:|---:|---:|---:|")
    for ours, other in RATIOS:
        for concurrency in args.concurrency:
            mine, theirs = by_key.get((ours, concurrency)), by_key.get((other, concurrency))
            if mine is None or theirs is None:
                continue
            lines.append(
                f"| {ours} vs {other} | {concurrency} | {_ratio(mine.aggregate, theirs.aggregate)} "
                f"| {_ratio(mine.per_stream, theirs.per_stream)} | {_ratio(theirs.ttft(0.5), mine.ttft(0.5))} |"
            )
    return "\n".join(lines)


def _ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}x" if denominator and not math.isnan(denominator) else "n/a"


def write_readme(readme: Path, text: str) -> None:
    """Replace what lies between the bench markers in ``readme``."""
    content = readme.read_text(encoding="utf-8")
    start, end = content.index(README_START) + len(README_START), content.index(README_END)
    readme.write_text(f"{content[:start]}\n{text}\n{content[end:]}", encoding="utf-8")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=None, help="per cell (default: 2 x concurrency, at least 4)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=16, help="our server's --max-batch-size")
    parser.add_argument("--threads", type=int, default=None, help="our server's --threads (default: its own)")
    parser.add_argument(
        "--prefix-cache-mib", type=int, default=None, help="our server's --prefix-cache-mib (default: its own)"
    )
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave llama.cpp out (no build, no conversion)")
    parser.add_argument(
        "--avx2",
        action="store_true",
        help="what an AVX2-only CPU runs, on this one: ours on its AVX2 build with torch and oneDNN held to AVX2, "
        "llama.cpp built for AVX2 (no AVX-512)",
    )
    parser.add_argument(
        "--llama-cpp-flag",
        action="append",
        default=[],
        help="one more llama-server flag (repeatable), e.g. --llama-cpp-flag=--no-repack where its AMX product crashes",
    )
    parser.add_argument("--warmup", type=int, default=2, help="requests before measuring (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved passes per cell (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8311)
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument(
        "--only", nargs="+", default=None, help="server names to run (substring match), e.g. hf-openai 'serve'"
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help="snapshot cache (default: the server's)")
    parser.add_argument("--readme", type=Path, default=None, help="write the table into this README's markers")
    args = parser.parse_args(argv)
    if args.cache_dir is None:
        sys.path.insert(0, str(ROOT))
        from adapters.huggingface.loading import default_cache_dir  # noqa: PLC0415

        args.cache_dir = default_cache_dir()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run every cell, print the table, and write it into the README when asked."""
    args = parse_args(argv)
    snapshot = snapshot_dir(args.cache_dir)
    print(f"machine: {machine()}\nsnapshot: {snapshot}", flush=True)
    selected = [s for s in servers(args, snapshot) if not args.only or any(part in s.name for part in args.only)]
    cells = bench(selected, args)
    our_flags = f"--threads {args.threads}" if args.threads else "its default --threads"
    if args.prefix_cache_mib is not None:
        our_flags += f" and --prefix-cache-mib {args.prefix_cache_mib}"
    settings = (
        f"SmolLM2-135M-Instruct, streaming chat, max_tokens {args.max_tokens}, "
        f"temperature 0, {len(PROMPTS)} prompts in rotation, {args.warmup} warm-up requests, {args.rounds} "
        "interleaved rounds per cell (aggregate: median of rounds; per-stream and TTFT: over all requests); "
        f"ours with --max-batch-size {args.max_batch_size} and {our_flags}, transformers serve with torch's "
        f"default threads, llama-server with -np {args.max_batch_size} -t {os.cpu_count()}"
        f"{''.join(f' {flag}' for flag in args.llama_cpp_flag)}"
        f"{AVX2_NOTE if args.avx2 else ''}. Every server stays up "
        "through the run and the rounds alternate them, so other work on the machine weighs on each alike."
    )
    report = f"Measured {time.strftime('%Y-%m-%d')} on {machine()}.\n{settings}\n\n{table(cells, args)}"
    print(f"\n{report}")
    if args.readme is not None:
        write_readme(args.readme, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
