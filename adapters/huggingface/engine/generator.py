"""The ``Generator`` port over the engine: requests that can share the batch join it, the rest go the plain way."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING

import attrs
import structlog
from transformers import DynamicCache, GenerationConfig

from adapters.huggingface.delivery import ThreadToLoop
from adapters.huggingface.engine import attention
from adapters.huggingface.engine.decoder import LeanDecoder
from adapters.huggingface.engine.forward import Forward
from adapters.huggingface.engine.loop import EngineLoop
from adapters.huggingface.engine.rows import Row
from adapters.huggingface.engine.scheduler import BatchLimits, Scheduler
from adapters.huggingface.engine.speculative import DraftCounts, Speculation
from adapters.huggingface.model_facts import ModelFacts, TellsModelFacts
from adapters.huggingface.threads import on_own_thread
from adapters.huggingface.transformers_compat import has_plain_layers
from domain.errors import QueueFullError
from domain.generation import GeneratedTokens, GenerationParams, TokenLogprob
from domain.options import unbatched

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from adapters.huggingface.generator import HuggingFaceGenerator
    from adapters.huggingface.prefix_cache import PrefixCache
    from adapters.huggingface.threads import ThreadTuner

log = structlog.get_logger(__name__)

CLOSE_TIMEOUT = 5.0
"""Seconds ``close`` waits for the engine thread to end its current step."""


@attrs.define
class BatchingGenerator(TellsModelFacts):
    """The ``Generator`` port with continuous batching over a ``HuggingFaceGenerator``'s model.

    One engine thread owns the model for batched decoding. Requests that cannot share a batch (beam search, diverse
    beam search, classifier-free guidance, output constraints) go through the plain generator, on its own thread.
    At most ``limits.max_batch_size`` sequences decode together; at most ``limits.max_queue`` wait for a slot, past
    that a request fails with ``QueueFullError``. Model facts, tokenization and scoring are the plain generator's.
    """

    plain: HuggingFaceGenerator
    limits: BatchLimits = attrs.field(factory=BatchLimits)
    threads: ThreadTuner | None = None
    """Picks torch's CPU thread count for each forward pass; ``None`` leaves torch's setting alone (GPUs)."""
    _prefixes: PrefixCache | None = attrs.field(default=None, alias="prefixes")
    speculation: Speculation = attrs.field(factory=Speculation)
    """Prompt-lookup drafts: how many tokens a row guesses ahead (``tokens=0``: none)."""
    _scheduler: Scheduler = attrs.field(init=False)
    _engine: EngineLoop = attrs.field(init=False)
    _unbatched: int = attrs.field(init=False, default=0)
    batchable_model: bool = attrs.field(init=False, default=False)
    """Whether the model's cache is one plain ``DynamicLayer`` per layer (else every request goes the plain way)."""

    def __attrs_post_init__(self) -> None:
        self.batchable_model = has_plain_layers(self.model.config)
        if not self.batchable_model:
            layers = DynamicCache(config=self.model.config).layers
            log.warning("batching.unsupported_cache", layers=sorted({type(layer).__name__ for layer in layers}))
        attention.install()  # one query's attention as the lean decoder's; verifying passes one query at a time
        self._scheduler = Scheduler(self.limits)
        forward = Forward(self.model, self.threads)
        if self.batchable_model:
            model = self.model
            forward.decoder = on_own_thread(  # its OpenMP team ends with it (see `on_own_thread`)
                lambda: LeanDecoder.for_model(model, forward.model_step, forward.model_pass), name="lean-decoder-probe"
            )
        self._engine = EngineLoop(
            forward,
            self.tokenizer,
            self._scheduler,
            prefixes=self._prefixes,
            speculation=self.speculation,
        )

    @property
    def prefixes(self) -> PrefixCache | None:
        """Keys and values of prompt blocks seen before, reused by later prompts that begin with them."""
        return self._engine.prefixes

    @property
    def drafts(self) -> DraftCounts:
        """Draft tokens proposed and kept since the engine started."""
        return self._engine.drafts

    # --- the model facts, shared with the plain generator -------------------------------------------------------

    @property
    def facts(self) -> ModelFacts:
        """The model's name, limits and tokenizer facts."""
        return self.plain.facts

    @property
    def model(self) -> PreTrainedModel:
        """The transformers model."""
        return self.facts.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer."""
        return self.facts.tokenizer

    def generation_config(self, params: GenerationParams, *, prompt_length: int) -> GenerationConfig:
        """The validated ``GenerationConfig`` for a request (see ``HuggingFaceGenerator.generation_config``)."""
        return self.plain.generation_config(params, prompt_length=prompt_length)

    async def score(self, token_ids: Sequence[int], *, top: int, adapter: str | None = None) -> list[TokenLogprob]:
        """Log-probability of each of ``token_ids[1:]`` given what precedes it, on the plain generator's thread."""
        return await self.plain.score(token_ids, top=top, adapter=adapter)

    # --- generation -------------------------------------------------------------------------------------------

    def batchable(self, params: GenerationParams) -> bool:
        """Whether a request can decode in the shared batch: one hypothesis, no guidance model, no constraint."""
        base = self.model.generation_config
        defaults = {"num_beams": base.num_beams, "num_beam_groups": base.num_beam_groups}
        if base.guidance_scale is not None:
            defaults["guidance_scale"] = base.guidance_scale
        asked = {name: value for name, value in defaults.items() if value is not None} | dict(params.options)
        return self.batchable_model and params.constraint is None and not unbatched(asked)

    async def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams
    ) -> AsyncGenerator[GeneratedTokens, None]:
        """Stream new tokens after ``prompt_ids``; the last item carries the finish reason.

        Raises ``QueueFullError`` when ``limits.max_queue`` requests already wait; closing the iterator takes the
        request out of the queue, or out of the batch at the next step.
        """
        if not self.batchable(params):
            async with (
                self._unbatched_slot(),
                contextlib.aclosing(self.plain.generate(prompt_ids, params)) as plain_steps,
            ):
                async for step in plain_steps:
                    yield step
            return
        config = self.generation_config(params, prompt_length=len(prompt_ids))
        log.debug("generation.config", config=config.to_diff_dict(), seed=params.seed)
        steps: ThreadToLoop[GeneratedTokens | BaseException | None] = ThreadToLoop()
        row = Row(prompt_ids=tuple(prompt_ids), params=params, config=config, deliver=steps.put)
        self._scheduler.submit(row, running=self._engine.running, start_worker=self._engine.start)
        released = False
        try:
            while (item := await steps.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
            released = True
        finally:
            row.cancelled.set()
            if not released and not self._scheduler.withdraw(row):
                self._scheduler.wake()
                while not released and self._engine.alive():
                    item = await steps.get()  # wait for the engine to let go of the row: at most one step
                    released = item is None

    def close(self) -> None:
        """Stop the engine: waiting and running requests fail, the plain generator stops taking work.

        Waits (a few seconds at most) for the engine thread to finish its step, so that it is not torn down mid-way.
        """
        self._scheduler.close()
        self.plain.close()
        self._engine.join(CLOSE_TIMEOUT)

    @contextlib.asynccontextmanager
    async def _unbatched_slot(self) -> AsyncGenerator[None, None]:
        """Count a plain-path request against the queue limit while it runs or waits."""
        if self._unbatched >= self.limits.max_queue:
            raise QueueFullError(self.limits.queue_full_message())
        self._unbatched += 1
        try:
            yield
        finally:
            self._unbatched -= 1


__all__ = ["BatchingGenerator"]
