"""Continuous batching: one thread decodes every running request together, one token per step.

A request joins the running batch at the next step (its prompt is prefilled, alone or with the other newcomers, and
its cache is merged into the batch's); a finished or abandoned one leaves at the next step without waiting for the
others. Each row keeps its own ``GenerationConfig``, logits processors, stopping criteria and random generator, all
built with transformers' own machinery, so a request decodes as it would alone through ``model.generate``.

- `generator`: the ``Generator`` port (``BatchingGenerator``), and the hand-off from the engine thread to asyncio;
- `scheduler`: the waiting queue, admission within the prefill budget, and refusal when full (``BatchLimits``);
- `loop`: the engine thread (admit, prefill, step, release);
- `rows`: one request's set-up, sampling and ending;
- `prefill`: grouping prompts, the cached/computed column layout, remembering prompt blocks;
- `kv_batch`: the running rows' left-padded cache, which rows join and leave;
- `forward`: one forward pass, with the thread tuner;
- `decoder`: the lean decoding pass, transformers' logits bit for bit with fewer ops, for Llama-style models;
- `speculative`: prompt-lookup drafts, checked in the decoding step, and their counts;
- `attention`: a verifying pass's attention, one query position at a time.
"""

from __future__ import annotations

from adapters.huggingface.engine.generator import BatchingGenerator
from adapters.huggingface.engine.scheduler import BatchLimits
from adapters.huggingface.engine.speculative import Speculation

__all__ = ["BatchLimits", "BatchingGenerator", "Speculation"]
