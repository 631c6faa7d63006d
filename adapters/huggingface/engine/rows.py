"""One request as the engine thread sees it, and what happens to a row on its own: set-up, sampling, ending."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np
import structlog
import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from adapters.huggingface.generator import finish_reason
from adapters.huggingface.processors import LeanStopping, LogprobRecorder, apply, lean, request_processors
from adapters.huggingface.transformers_compat import (
    logits_processors,
    prepare_generation_config,
    prepare_special_tokens,
    stopping_criteria,
)
from domain.errors import DomainError, GenerationError
from domain.generation import FinishReason, GeneratedTokens, GenerationParams, TokenLogprob

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from adapters.huggingface.prefix_cache import PrefixBlock

log = structlog.get_logger(__name__)

Delivery = Callable[[GeneratedTokens | BaseException | None], bool]
"""Hands an item to a row's consumer; ``None`` says the engine has let go of the row. ``False``: consumer gone."""


@attrs.define(eq=False, repr=False)
class Row:
    """One request as the engine thread sees it: its settings, its tokens so far, and where its steps go."""

    prompt_ids: tuple[int, ...]
    params: GenerationParams
    config: GenerationConfig
    deliver: Delivery
    cancelled: threading.Event = attrs.field(factory=threading.Event)
    processors: LogitsProcessorList = attrs.field(factory=LogitsProcessorList)
    stopping: LeanStopping = attrs.field(factory=lambda: LeanStopping(StoppingCriteriaList()))
    recorder: LogprobRecorder | None = None
    rng: torch.Generator | None = None
    ids: torch.Tensor = attrs.field(factory=lambda: torch.empty(0, dtype=torch.long))
    """Prompt and generated tokens, shape ``[1, length]``: what logits processors and stopping criteria read."""
    cached: int = 0
    """How many of ``ids`` the KV cache holds (all but the last sampled token, once prefilled)."""
    reused: list[PrefixBlock] = attrs.field(factory=list)
    """Cached prompt blocks this row's prefill starts after."""
    finish_reason: FinishReason | None = None
    draft_misses: int = 0
    """Drafts in a row of which no token was kept (`speculative.pause_after`)."""
    draft_pause: int = 0
    """Decoding steps the row still skips drafting."""
    released: bool = False
    """The consumer has been told the engine let go of the row."""

    @property
    def generated(self) -> int:
        """How many tokens this row has produced."""
        return int(self.ids.shape[-1]) - len(self.prompt_ids)

    @property
    def done(self) -> bool:
        """Finished, or its consumer left."""
        return self.finish_reason is not None or self.cancelled.is_set()

    @property
    def room(self) -> int:
        """How many tokens the row may still produce (``max_new_tokens`` and the context window decide)."""
        return int(self.config.max_length) - int(self.ids.shape[-1])

    @property
    def reused_tokens(self) -> int:
        """How many prompt tokens come from the prefix cache."""
        return sum(len(block.tokens) for block in self.reused)


def prepare(row: Row, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Build the row's processors and stopping criteria as ``generate`` would, and its random generator."""
    hidden: Any = model  # generate's helpers, which nn.Module's typing hides
    prompt_length = len(row.prompt_ids)
    config = prepare_generation_config(hidden, row.config)  # generate's defaults (top_k=50...)
    row.config = config
    config.max_length = (config.max_new_tokens or 0) + prompt_length
    if config.min_new_tokens is not None:
        config.min_length = config.min_new_tokens + prompt_length
    ids = torch.tensor([row.prompt_ids], dtype=torch.long, device=model.device)
    prepare_special_tokens(hidden, config)
    custom, row.recorder = request_processors(row.params, prompt_length=prompt_length)
    row.processors = lean(logits_processors(hidden, config, ids, custom))  # the scores `generate`'s list gives
    row.stopping = LeanStopping(stopping_criteria(hidden, config, tokenizer))
    if row.params.seed is not None and config.do_sample:
        row.rng = torch.Generator(device=model.device)
        row.rng.manual_seed(row.params.seed)
    row.ids = ids


def advance(row: Row, logits: torch.Tensor, *, draft: Sequence[int] = (), cached_tokens: int = 0) -> int:
    """Pick the row's next tokens from ``logits``, hand them over, and check whether the row is done.

    ``logits``: ``[1 + len(draft), vocab]``, position ``j``'s computed after the row's tokens and ``draft[:j]``.
    Tokens are picked one at a time, exactly as without a draft (the row's processors, its argmax or its random
    generator); the next position is used only while the token picked equals the draft's, and the row is not done.
    Returns how many of ``draft`` equalled the tokens picked: those whose keys and values the cache keeps.
    ``cached_tokens``: on the first token, how many prompt tokens came from the prefix cache. A failure ends this
    row alone.
    """
    accepted = 0
    try:
        picked: list[int] = []
        logprobs: list[TokenLogprob] = []
        for position in range(len(draft) + 1):
            scores = apply(row.processors, row.ids, logits[position : position + 1])
            if row.config.do_sample:
                token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=row.rng)
            else:
                token = best(scores)
            row.ids = torch.cat([row.ids, token.to(row.ids.dtype)], dim=-1)
            picked.append(int(token))
            if row.recorder is not None:
                logprobs.extend(row.recorder.logprobs_of(picked[-1:]))
            guessed = position < len(draft) and picked[-1] == draft[position]
            accepted += guessed
            if row.stopping(row.ids, scores):
                row.finish_reason = finish_reason(row.ids[0, len(row.prompt_ids) :].tolist(), row.config)
                break
            if not guessed:
                break
        step = GeneratedTokens(token_ids=tuple(picked), logprobs=tuple(logprobs), cached_tokens=cached_tokens)
        if not row.deliver(step):
            row.cancelled.set()
    except Exception as error:  # noqa: BLE001  only this request is at fault
        fail([row], error)
    return accepted


def best(scores: torch.Tensor) -> torch.Tensor:
    """``torch.argmax(scores, dim=-1, keepdim=True)``: the first of the highest scores (a NaN counts as highest).

    On the CPU, in float32 or float64, numpy's argmax, which gives the same index: torch's CPU argmax is not
    vectorised, and took 75 us over SmolLM2's 49152 scores on a 2-core Xeon against numpy's 4.4, once a row a step.
    """
    if scores.device.type != "cpu" or scores.dtype not in {torch.float32, torch.float64}:
        return torch.argmax(scores, dim=-1, keepdim=True)
    return torch.from_numpy(np.argmax(scores.numpy(), axis=-1, keepdims=True))


def release(row: Row) -> None:
    """Tell the row's consumer, once, that the engine has let go of it."""
    if not row.released:
        row.released = True
        row.deliver(None)


def fail(rows: Sequence[Row], error: Exception) -> None:
    """End ``rows`` with ``error`` (a domain error as it is, anything else as a ``GenerationError``)."""
    if not rows:
        return
    if not isinstance(error, DomainError):
        log.error("generation.failed", exc_info=error, rows=len(rows))
        failure: DomainError = GenerationError(f"Generation failed: {error}")
        failure.__cause__ = error
    else:
        failure = error
    for row in rows:
        row.finish_reason = row.finish_reason or FinishReason.STOP
        row.cancelled.set()
        row.deliver(failure)
        release(row)


__all__ = ["Delivery", "Row", "advance", "best", "fail", "prepare", "release"]
