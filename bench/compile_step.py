"""Does ``torch.compile`` pay for itself on the engine's decoding step? Eager against compiled, side by side.

The step is the engine's: ``batch`` rows, one new token each over a growing cache of the engine's own layers, the
output projection on the last position only. Reports the compiled model's start-up (its first steps, compiling
and recompiling as the cache grows) and the median ms per step after it, against eager, and after how many steps
the start-up is paid back.

    python bench/compile_step.py --batch 1 16 --steps 48
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from adapters.huggingface.cpu_features import describe_cpu
from adapters.huggingface.loading import load_model
from adapters.huggingface.transformers_compat import growing_cache

CONTEXT = 40


def decode(model: Any, batch: int, steps: int) -> list[float]:  # noqa: ANN401
    """Seconds of a ``CONTEXT``-token prefill, then of each decoding step."""
    ids = torch.randint(100, 10000, (batch, CONTEXT + steps))
    started = time.perf_counter()
    with torch.inference_mode():
        cache = growing_cache(model.config)
        model(input_ids=ids[:, :CONTEXT], cache=cache, use_cache=True, logits_to_keep=1)
        times = [time.perf_counter() - started]
        for step in range(steps):
            started = time.perf_counter()
            positions = torch.full((batch, 1), CONTEXT + step)
            column = ids[:, CONTEXT + step : CONTEXT + step + 1]
            model(input_ids=column, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
            times.append(time.perf_counter() - started)
    return times


def main() -> None:
    """Eager, then compiled, per batch size."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-pack-weights", action="store_false", dest="pack_weights")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(None, device="cpu", pack_weights=args.pack_weights).model
    compiled = torch.compile(model, dynamic=True)
    print(f"{describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| batch | eager ms/step | compiled ms/step | start-up s (prefill + 4 steps, over eager) | paid back after |")
    print("|---:|---:|---:|---:|---:|")
    for batch in args.batch:
        eager = decode(model, batch, args.steps)
        fast = decode(compiled, batch, args.steps)
        eager_ms = statistics.median(eager[5:]) * 1000
        fast_ms = statistics.median(fast[5:]) * 1000
        startup = sum(fast[:5]) - sum(eager[:5])  # the prefill and the first 4 steps
        saved = (eager_ms - fast_ms) / 1000
        payback = f"{startup / saved:.0f} steps" if saved > 0 else "never"
        print(f"| {batch} | {eager_ms:.1f} | {fast_ms:.1f} | {startup:.1f} | {payback} |")


if __name__ == "__main__":
    main()
