"""What quantization costs in quality: the log-likelihood of a fixed text, float32 against int8 and int4.

Scored as lm-eval's ``local-completions`` backend scores: ``POST /v1/completions`` with ``echo: true``,
``logprobs: 1``, ``max_tokens: 0`` returns the prompt's own token logprobs from one forward pass. Each scheme is
served by its own server process on the embedded SmolLM2; the report gives the total and mean per-token logprob
of the text, and each scheme's difference from float32.

    python bench/quality.py                 # none, int8, int4
    python bench/quality.py --schemes none int8
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import Server, running

TEXT = (
    "The printing press, developed by Johannes Gutenberg around 1440, changed how knowledge spread across Europe. "
    "Before it, books were copied by hand, a slow and costly process that kept them rare. With movable metal type, "
    "a workshop could print hundreds of copies of a text in the time a scribe needed for one. Prices fell, literacy "
    "rose, and ideas travelled faster than ever before. Scientists shared their results, reformers spread their "
    "pamphlets, and a new public of readers began to form. Within fifty years, millions of books had been printed, "
    "and the press had become one of the most important inventions in human history.\n\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
)


def score(port: int) -> list[float]:
    """The text's token logprobs (the first token, which has none, left out)."""
    body = {"model": "m", "prompt": TEXT, "echo": True, "logprobs": 1, "max_tokens": 0, "temperature": 0}
    reply = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600)
    reply.raise_for_status()
    values = reply.json()["choices"][0]["logprobs"]["token_logprobs"]
    return [float(v) for v in values if v is not None]


def main(argv: Sequence[str] | None = None) -> int:
    """Score the text under each scheme and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", nargs="+", default=["none", "int8", "int4"])
    parser.add_argument("--port", type=int, default=8411)
    args = parser.parse_args(argv)
    results: dict[str, list[float]] = {}
    for offset, scheme in enumerate(args.schemes):
        port = args.port + offset
        command = [sys.executable, "-m", "entrypoints.http", "--port", str(port), "--device", "cpu"]
        server = Server(f"quantize {scheme}", [*command, "--quantize", scheme, "--log-level", "WARNING"], port, "m")
        with running(server, timeout=600):
            results[scheme] = score(port)
    base = results.get("none")
    print("| weights | tokens | total logprob | mean per token | vs float32 (total) | vs float32 (mean) |")
    print("|---|---:|---:|---:|---:|---:|")
    for scheme, values in results.items():
        total, mean = sum(values), statistics.fmean(values)
        versus = ("n/a", "n/a")
        if base is not None and len(base) == len(values):
            versus = (f"{total - sum(base):+.3f}", f"{mean - statistics.fmean(base):+.4f}")
        name = "float32" if scheme == "none" else scheme
        print(f"| {name} | {len(values)} | {total:.3f} | {mean:.4f} | {versus[0]} | {versus[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
