"""Where a decoding step's milliseconds go, through the real batching engine on the embedded SmolLM2.

Runs ``--batch`` greedy requests together (chat prompts, ``--tokens`` each) through ``BatchingGenerator`` and times,
per decoding step: the step's period on the engine thread, the model's forward pass, what the engine does around it
(logits processors, sampling, hand-off to the event loop, cache bookkeeping), and, from the torch profiler over the
same steps, the forward's ops by kind: the linear layers (weight reads), the 49152-row output projection,
attention, the other ops (norms, rotary, activations, copies), and Python and dispatch (what no op accounts for).

    python bench/step_profile.py                        # batch 1 and 16, torch's threads = cores
    python bench/step_profile.py --batch 1 4 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from adapters.huggingface.cpu_features import describe_cpu
from adapters.huggingface.engine import BatchingGenerator, BatchLimits, Speculation
from adapters.huggingface.engine import loop as engine_loop
from adapters.huggingface.generator import HuggingFaceGenerator
from adapters.huggingface.loading import load_model
from adapters.huggingface.threads import on_own_thread
from adapters.huggingface.transformers_compat import growing_cache
from domain.generation import GenerationParams

QUESTIONS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle works, part by part, for a curious ten-year-old.",
    "Describe a busy market in the morning: the sounds, the smells and the people.",
    "Give me a detailed recipe for a vegetable soup, with every step.",
)
LINEAR_OPS = (
    "mkldnn::_linear_pointwise",
    "aten::addmm",
    "aten::mm",
    "aten::bmm",
    "quantized::linear_dynamic",  # int8 (FBGEMM)
    "aten::_weight_int4pack_mm_for_cpu",  # int4
    "hf_openai_server::int8_linear",  # int8 and int4, our kernels (adapters/huggingface/native)
    "hf_openai_server::int4_linear",
    "hf_openai_server::float_linear",
)
LAYER_OPS = (  # a layer's halves, or a decoding step's whole layer, in one op of ours
    "hf_openai_server::attention_input",
    "hf_openai_server::layer_output",
    "hf_openai_server::decode_layers",
)
HEAD_RANGE = "output projection"
ATTENTION_OPS = (
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math",
    "hf_openai_server::one_query_attention",
)


class Timings:
    """Wall times the engine thread reports: its forward passes, and the row work (``advance``) around them."""

    def __init__(self) -> None:
        self.decode_starts: list[float] = []
        self.forward: list[float] = []
        self.advance: list[float] = []

    def wrap_forward(self, forward: Any) -> Any:  # noqa: ANN401  the engine's Forward
        """``forward``, noting when each decoding pass (``step``) starts and how long it takes."""
        timings = self

        class Timed:
            model = forward.model

            def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # noqa: ANN401  a prefill
                return forward(*args, **kwargs)

            def step(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # noqa: ANN401
                started = time.perf_counter()
                logits = forward.step(*args, **kwargs)
                timings.decode_starts.append(started)
                timings.forward.append(time.perf_counter() - started)
                return logits

        return Timed()

    def wrap_advance(self, advance: Callable[..., int]) -> Callable[..., int]:
        """``rows.advance``, timed."""

        def timed(*args: Any, **kwargs: Any) -> int:  # noqa: ANN401
            started = time.perf_counter()
            result = advance(*args, **kwargs)
            self.advance.append(time.perf_counter() - started)
            return result

        return timed


def chat_prompts(generator: HuggingFaceGenerator, count: int) -> list[list[int]]:
    """``count`` chat prompts, the questions in rotation."""
    tokenizer = generator.tokenizer
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], add_generation_prompt=True
            )["input_ids"]
        )
        for i in range(count)
    ]


async def decode(engine: BatchingGenerator, prompts: list[list[int]], tokens: int) -> int:
    """Decode ``tokens`` greedy tokens after each prompt, all at once; how many came."""
    params = GenerationParams(temperature=0, max_new_tokens=tokens, options={"ignore_eos": True})

    async def one(prompt_ids: list[int]) -> int:
        return sum([len(step.token_ids) async for step in engine.generate(prompt_ids, params)])

    return sum(await asyncio.gather(*(one(p) for p in prompts)))


def op_times(forward: Any, batch: int, context: int, steps: int = 8) -> dict[str, float]:  # noqa: ANN401
    """Ms per decoding pass: its wall time unprofiled, and its ops' self CPU time by kind (torch profiler).

    The passes are the engine's (``forward.step``, the lean decoder where the model has one): ``batch`` rows of
    ``context`` cached tokens, one new token each. What the ops do not account for of the wall time is Python and
    dispatch (the profiler's own cost per op makes that an underestimate).
    """
    ids = torch.randint(100, 10000, (batch, context + 2 * steps))
    kinds = {"wall": 0.0, "linear": 0.0, "head": 0.0, "attention": 0.0, "layer ops": 0.0, "other ops": 0.0}
    model = forward.model
    head = model.get_output_embeddings()
    ranges: list[Any] = []
    hooks = [  # the output projection's ops are those inside this range (int8 weights show no shape to tell)
        head.register_forward_pre_hook(lambda *_: ranges.append(record_function(HEAD_RANGE).__enter__())),
        head.register_forward_hook(lambda *_: ranges.pop().__exit__(None, None, None)),
    ]
    with torch.inference_mode():
        cache = growing_cache(model.config)
        model(input_ids=ids[:, :context], cache=cache, use_cache=True, logits_to_keep=1)

        def one(step: int) -> None:
            positions = torch.full((batch, 1), context + step)
            column = ids[:, context + step : context + step + 1]
            forward.step(column, positions, torch.ones((batch, context + step + 1), dtype=torch.long), cache)

        started = time.perf_counter()
        for step in range(steps):
            one(step)
        kinds["wall"] = (time.perf_counter() - started) * 1000 / steps
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
            for step in range(steps, 2 * steps):
                one(step)
    for hook in hooks:
        hook.remove()
    for event in profiler.events():
        if not event.key.startswith(("aten::", "mkldnn::", "quantized::", "hf_openai_server::")):
            continue
        if event.key in LINEAR_OPS:
            kind = "head" if in_range(event, HEAD_RANGE) else "linear"
        else:
            kind = "attention" if event.key in ATTENTION_OPS else "layer ops" if event.key in LAYER_OPS else "other ops"
        kinds[kind] += event.self_cpu_time_total / 1000 / steps
    return kinds


def in_range(event: Any, name: str) -> bool:  # noqa: ANN401  a profiler FunctionEvent
    """Whether ``event`` ran inside a ``record_function(name)`` range."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def profile_batch(loaded: Any, batch: int, tokens: int) -> dict[str, float]:  # noqa: ANN401
    """The breakdown of a step with ``batch`` requests decoding together, in ms (and the end-to-end tok/s)."""
    plain = HuggingFaceGenerator(loaded.model, loaded.tokenizer, model_id=loaded.model_id)
    engine = BatchingGenerator(plain, BatchLimits(max_batch_size=batch), speculation=Speculation(0))
    timings = Timings()
    loop: Any = engine._engine  # noqa: SLF001  a bench reaches into the engine to time it
    engine_forward = loop.forward
    loop.forward = timings.wrap_forward(engine_forward)
    advance = engine_loop.row_ops.advance
    engine_loop.row_ops.advance = timings.wrap_advance(advance)
    prompts = chat_prompts(plain, batch)
    try:
        asyncio.run(decode(engine, prompts, 4))  # warm-up
        timings.__init__()  # type: ignore[misc]
        started = time.perf_counter()
        produced = asyncio.run(decode(engine, prompts, tokens))
        wall = time.perf_counter() - started
    finally:
        engine_loop.row_ops.advance = advance
        engine.close()
    steps = len(timings.forward)
    periods = [b - a for a, b in zip(timings.decode_starts, timings.decode_starts[1:], strict=False)]
    forward = statistics.median(timings.forward) * 1000
    advance_ms = sum(timings.advance) * 1000 / steps
    period = statistics.median(periods) * 1000
    context = len(prompts[0]) + tokens // 2
    ops = on_own_thread(lambda: op_times(engine_forward, batch, context), name="op-times")  # its team ends with it
    in_ops = sum(value for kind, value in ops.items() if kind != "wall")
    return {
        "step (engine thread period)": period,
        "forward pass": forward,
        "model alone, same shapes (a thread of its own)": ops["wall"],
        "  linear layers (weight reads)": ops["linear"],
        "  output projection (vocabulary rows)": ops["head"],
        "  attention (sdpa)": ops["attention"],
        "  our layer ops (their products, attention and the rest)": ops["layer ops"],
        "  other ops (norms, rotary, activations, copies)": ops["other ops"],
        "  Python and dispatch (wall - ops)": max(0.0, ops["wall"] - in_ops),
        "processors, sampling, hand-off (advance)": advance_ms,
        "rest of the step (inputs, mask, cache bookkeeping)": period - forward - advance_ms,
        "tok/s end to end": produced / wall,
    }


def main() -> None:
    """Profile each batch size and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=48, help="tokens each request decodes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--no-pack-weights", action="store_false", dest="pack_weights")
    parser.add_argument(
        "--quantize", choices=["none", "int8", "int4"], default=None, help="as the server's (default: int8, as it)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(None, device="cpu", pack_weights=args.pack_weights, quantize=args.quantize)
    scheme = args.quantize or "int8 (the embedded file's default)"
    print(
        f"{describe_cpu()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"SmolLM2-135M, weights {scheme}, packed: {args.pack_weights}; ms per decoding step (median), greedy"
    )
    results = {batch: profile_batch(loaded, batch, args.tokens) for batch in args.batch}
    print("| where | " + " | ".join(f"batch {b}" for b in results) + " |")
    print("|---|" + "---:|" * len(results))
    for name in next(iter(results.values())):
        print(f"| {name} | " + " | ".join(f"{r[name]:.1f}" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
