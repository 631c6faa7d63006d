"""Prompt-lookup speculation on and off, side by side, through the batching engine on the embedded SmolLM2.

Two kinds of task: answers that quote their prompt (repeat a passage with a change, edit a function) and free
answers (stories, explanations). For each concurrency and each ``--speculative-tokens`` value, the same greedy
requests run through an engine with that setting, the settings in alternating rounds so that a busy machine weighs on
each alike; the table gives aggregate completion tok/s (median of rounds), each setting's ratio to 0 (off), and the
share of draft tokens accepted. The outputs are compared too: speculation must not change a token.

    python bench/speculative.py                       # 0 and 4 tokens, 1 and 4 streams, quoting and free tasks
    python bench/speculative.py --tokens 0 2 4 8 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import torch

from adapters.huggingface.cpu_features import describe_cpu
from adapters.huggingface.engine import BatchingGenerator, BatchLimits, Speculation
from adapters.huggingface.generator import HuggingFaceGenerator
from adapters.huggingface.loading import load_model
from domain.generation import GenerationParams

PASSAGE = (
    "The old lighthouse stood at the end of the rocky point, its white paint peeling in the salty wind. Every "
    "evening the keeper climbed the one hundred and twelve steps to light the lamp, and every morning he wrote "
    "the weather in a thick blue notebook."
)
CODE = """def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax
"""
TASKS = {
    "quoting": (
        f"Repeat this paragraph exactly, but replace 'keeper' with 'guardian':\n\n{PASSAGE}",
        f"Rename the function total_price to compute_total in this code and return the whole code:\n\n{CODE}",
        f"Copy this text word for word:\n\n{PASSAGE}",
        f"Add a docstring to this Python function and return the full function:\n\n{CODE}",
    ),
    "free": (
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Explain how a bicycle works, part by part, for a curious ten-year-old.",
        "Describe a busy market in the morning: the sounds, the smells and the people.",
        "Give me a detailed recipe for a vegetable soup, with every step.",
    ),
}


def prompt_ids(generator: HuggingFaceGenerator, text: str) -> list[int]:
    """The chat prompt for ``text``."""
    return list(
        generator.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)[
            "input_ids"
        ]
    )


async def run_round(engine: BatchingGenerator, prompts: list[list[int]], concurrency: int, tokens: int) -> Any:  # noqa: ANN401
    """Every prompt once, ``concurrency`` at a time: (tok/s, outputs)."""
    params = GenerationParams(temperature=0, max_new_tokens=tokens)
    gate = asyncio.Semaphore(concurrency)

    async def one(ids: list[int]) -> list[int]:
        async with gate:
            return [token async for step in engine.generate(ids, params) for token in step.token_ids]

    started = time.perf_counter()
    outputs = await asyncio.gather(*(one(ids) for ids in prompts))
    return sum(map(len, outputs)) / (time.perf_counter() - started), outputs


def main() -> None:
    """Run every cell and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[0, 4], help="speculative tokens to compare")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--quantize", choices=["none", "int8"], default="none", help="the model's weights")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(None, device="cpu", quantize=args.quantize)
    plain = HuggingFaceGenerator(loaded.model, loaded.tokenizer, model_id=loaded.model_id)
    engines = {
        k: BatchingGenerator(plain, BatchLimits(max_batch_size=16), speculation=Speculation(k)) for k in args.tokens
    }
    print(
        f"{describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"SmolLM2-135M, weights {args.quantize}; "
        f"greedy, max_tokens {args.max_tokens}, {args.rounds} alternating rounds per cell, aggregate tok/s (median)"
    )
    print("| task | streams | speculative tokens | tok/s | vs off | drafts accepted | same output |")
    print("|---|---:|---:|---:|---:|---:|---|")
    try:
        for task, texts in TASKS.items():
            prompts = [prompt_ids(plain, text) for text in texts]
            for concurrency in args.concurrency:
                rates: dict[int, list[float]] = {k: [] for k in engines}
                outputs: dict[int, Any] = {}
                drafts: dict[int, tuple[int, int]] = dict.fromkeys(engines, (0, 0))
                asyncio.run(run_round(engines[args.tokens[0]], prompts[:1], 1, 4))  # warm-up
                for _ in range(args.rounds):
                    for k, engine in engines.items():
                        before = engine.drafts.totals()
                        rate, outputs[k] = asyncio.run(run_round(engine, prompts, concurrency, args.max_tokens))
                        after = engine.drafts.totals()
                        rates[k].append(rate)
                        drafts[k] = (drafts[k][0] + after[0] - before[0], drafts[k][1] + after[1] - before[1])
                base = statistics.median(rates[args.tokens[0]])
                for k in engines:
                    rate = statistics.median(rates[k])
                    proposed, accepted = drafts[k]
                    share = f"{accepted}/{proposed}" if proposed else "-"
                    same = outputs[k] == outputs[args.tokens[0]]
                    print(f"| {task} | {concurrency} | {k} | {rate:.1f} | {rate / base:.2f}x | {share} | {same} |")
    finally:
        for engine in engines.values():
            engine.close()


if __name__ == "__main__":
    main()
