"""Continuous batching: one thread decodes every running request together, one token per step.

A request joins the running batch at the next step (its prompt is prefilled, alone or with the other newcomers, and
its cache is merged into the batch's); a finished or abandoned one leaves at the next step without waiting for the
others. Each row keeps its own ``GenerationConfig``, logits processors, stopping criteria and random generator, all
built with transformers' own machinery, so a request decodes as it would alone through ``model.generate``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import attrs
import structlog
import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from adapters.huggingface.prefix_cache import PrefixBlock, PrefixCache, prefix_kv
from adapters.huggingface.processors import LogprobRecorder, OpenAIPenalties
from adapters.huggingface.threads import ThreadTuner
from adapters.huggingface.transformers_compat import (
    cache_layers,
    growing_cache,
    has_plain_layers,
    layer_kv,
    logits_processors,
    prepare_generation_config,
    prepare_special_tokens,
    stopping_criteria,
)
from domain.errors import DomainError, GenerationError, QueueFullError
from domain.generation import FinishReason, GeneratedTokens, GenerationParams, TokenLogprob

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from adapters.huggingface.generator import HuggingFaceGenerator

log = structlog.get_logger(__name__)

CLOSE_TIMEOUT = 5.0
"""Seconds ``close`` waits for the engine thread to end its current step."""

UNBATCHED_EXTRA_OPTIONS = frozenset({"num_beams", "num_beam_groups", "diversity_penalty", "guidance_scale"})
"""Options that, set through ``GenerationParams.extra``, send a request down the plain ``generate`` path."""


@attrs.frozen
class BatchLimits:
    """How much work the engine takes on: running sequences, and requests waiting for a slot."""

    max_batch_size: int = 8
    max_queue: int = 64
    prefill_tokens: int = 256
    """Prompt tokens prefilled between two decoding steps (a longer prompt goes alone).

    A burst of newcomers is prefilled a few at a time, so the first of them stream while the rest wait their turn and
    the running rows stall for a bounded time; one forward pass over more prompts is no faster per token on a CPU.
    """

    def __attrs_post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 0 or self.prefill_tokens < 1:
            msg = f"max_batch_size and prefill_tokens must be >= 1 and max_queue >= 0, got {self}"
            raise ValueError(msg)


@attrs.define(eq=False, repr=False)
class _Row:
    """One request as the engine thread sees it: its settings, its tokens so far, and where its steps go."""

    prompt_ids: tuple[int, ...]
    params: GenerationParams
    config: GenerationConfig
    deliver: Callable[[GeneratedTokens | BaseException | None], bool]
    """Hands an item to the consumer; ``None`` says the engine has let go of the row. ``False``: consumer gone."""
    cancelled: threading.Event = attrs.field(factory=threading.Event)
    processors: LogitsProcessorList = attrs.field(factory=LogitsProcessorList)
    stopping: StoppingCriteriaList = attrs.field(factory=StoppingCriteriaList)
    recorder: LogprobRecorder | None = None
    rng: torch.Generator | None = None
    ids: torch.Tensor = attrs.field(factory=lambda: torch.empty(0, dtype=torch.long))
    """Prompt and generated tokens, shape ``[1, length]``: what logits processors and stopping criteria read."""
    cached: int = 0
    """How many of ``ids`` the KV cache holds (all but the last sampled token, once prefilled)."""
    reused: list[PrefixBlock] = attrs.field(factory=list)
    """Cached prompt blocks this row's prefill starts after."""
    finish_reason: FinishReason | None = None
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


@attrs.define
class _Batch:
    """The running rows with one left-padded KV cache: row ``i`` holds its ``cached`` tokens in the last columns."""

    rows: list[_Row] = attrs.field(factory=list)
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None
    """``[rows, columns]``: 1 where the cache holds a real token, 0 on the left padding."""

    def add(self, rows: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Merge prefilled ``rows`` (their cache and mask) in, padding on the left whichever side is shorter."""
        if self.cache is None or self.mask is None or not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(cache_layers(self.cache), cache_layers(cache), strict=True):
            (my_keys, my_values), (their_keys, their_values) = layer_kv(mine), layer_kv(theirs)
            mine.keys = torch.cat([_pad_left(my_keys, width, dim=2), _pad_left(their_keys, width, dim=2)])
            mine.values = torch.cat([_pad_left(my_values, width, dim=2), _pad_left(their_values, width, dim=2)])
        self.mask = torch.cat([_pad_left(self.mask, width, dim=1), _pad_left(mask, width, dim=1)])
        self.rows.extend(rows)

    def keep(self, keep: Sequence[int]) -> None:
        """Keep only the rows at ``keep``, then drop the columns no remaining row uses."""
        if len(keep) == len(self.rows):
            return
        if not keep or self.cache is None or self.mask is None:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        first = int(self.mask.any(dim=0).int().argmax())
        self.mask = self.mask[:, first:]
        for layer in cache_layers(self.cache):
            keys, values = layer_kv(layer)
            layer.keys = keys.index_select(0, index)[:, :, first:]
            layer.values = values.index_select(0, index)[:, :, first:]
        self.rows = [self.rows[i] for i in keep]

    def grow(self) -> None:
        """One more real column for every row: the step just run appended each row's token to the cache."""
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)


def _pad_left(tensor: torch.Tensor, width: int, *, dim: int) -> torch.Tensor:
    """``tensor`` with zeros prepended along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


@attrs.define
class BatchingGenerator:
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
    prefixes: PrefixCache | None = None
    """Keys and values of prompt blocks seen before, reused by later prompts that begin with them."""
    _waiting: collections.deque[_Row] = attrs.field(init=False, factory=collections.deque)
    _condition: threading.Condition = attrs.field(init=False, factory=threading.Condition)
    _closed: bool = attrs.field(init=False, default=False)
    _unbatched: int = attrs.field(init=False, default=0)
    _batch: _Batch = attrs.field(init=False, factory=_Batch)
    _thread: threading.Thread | None = attrs.field(init=False, default=None)
    batchable_model: bool = attrs.field(init=False, default=False)
    """Whether the model's cache is one plain ``DynamicLayer`` per layer (else every request goes the plain way)."""

    def __attrs_post_init__(self) -> None:
        self.batchable_model = has_plain_layers(self.model.config)
        if not self.batchable_model:
            layers = DynamicCache(config=self.model.config).layers
            log.warning("batching.unsupported_cache", layers=sorted({type(layer).__name__ for layer in layers}))

    # --- the model facts, from the plain generator ------------------------------------------------------------

    @property
    def model(self) -> PreTrainedModel:
        """The transformers model."""
        return self.plain.model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer."""
        return self.plain.tokenizer

    @property
    def model_id(self) -> str:
        """The name clients use for the model."""
        return self.plain.model_id

    @property
    def context_length(self) -> int:
        """How many tokens (prompt and completion) fit in one sequence."""
        return self.plain.context_length

    @property
    def vocab_size(self) -> int:
        """How many token ids the model scores."""
        return self.plain.vocab_size

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's Jinja chat template, if it has one."""
        return self.plain.chat_template

    @property
    def bos_token(self) -> str | None:
        """The beginning-of-sequence token text, for chat templates."""
        return self.plain.bos_token

    @property
    def eos_token(self) -> str | None:
        """The end-of-sequence token text, for chat templates."""
        return self.plain.eos_token

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every token id that ends generation."""
        return self.plain.eos_token_ids

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``."""
        return self.plain.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        """Text of ``token_ids``."""
        return self.plain.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def generation_config(self, params: GenerationParams, *, prompt_length: int) -> GenerationConfig:
        """The validated ``GenerationConfig`` for a request (see ``HuggingFaceGenerator.generation_config``)."""
        return self.plain.generation_config(params, prompt_length=prompt_length)

    async def score(self, token_ids: Sequence[int], *, top: int) -> list[TokenLogprob]:
        """Log-probability of each of ``token_ids[1:]`` given what precedes it, on the plain generator's thread."""
        return await self.plain.score(token_ids, top=top)

    # --- generation -------------------------------------------------------------------------------------------

    def batchable(self, params: GenerationParams) -> bool:
        """Whether a request can decode in the shared batch: one hypothesis, no guidance model, no constraint."""
        base = self.model.generation_config
        return (
            self.batchable_model
            and (params.num_beams or base.num_beams or 1) == 1
            and (params.num_beam_groups or base.num_beam_groups or 1) == 1
            and (params.guidance_scale if params.guidance_scale is not None else base.guidance_scale) in (None, 1)
            and params.constraint is None
            and not UNBATCHED_EXTRA_OPTIONS & set(params.extra)
        )

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
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue[GeneratedTokens | BaseException | None] = asyncio.Queue()
        row = _Row(prompt_ids=tuple(prompt_ids), params=params, config=config, deliver=_deliverer(loop, steps))
        self._enqueue(row)
        released = False
        try:
            while (item := await steps.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
            released = True
        finally:
            row.cancelled.set()
            if not released and not self._dequeue(row):
                with self._condition:
                    self._condition.notify_all()
                while not released and self._worker_alive():
                    item = await steps.get()  # wait for the engine to let go of the row: at most one step
                    released = item is None

    def close(self) -> None:
        """Stop the engine: waiting and running requests fail, the plain generator stops taking work.

        Waits (a few seconds at most) for the engine thread to finish its step, so that it is not torn down mid-way.
        """
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self.plain.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=CLOSE_TIMEOUT)

    @contextlib.asynccontextmanager
    async def _unbatched_slot(self) -> AsyncGenerator[None, None]:
        """Count a plain-path request against the queue limit while it runs or waits."""
        if self._unbatched >= self.limits.max_queue:
            raise QueueFullError(_queue_full_message(self.limits))
        self._unbatched += 1
        try:
            yield
        finally:
            self._unbatched -= 1

    def _enqueue(self, row: _Row) -> None:
        with self._condition:
            if self._closed:
                raise GenerationError("The generator is shut down.")
            free = self.limits.max_batch_size - len(self._batch.rows)
            if len(self._waiting) - max(free, 0) >= self.limits.max_queue:
                raise QueueFullError(_queue_full_message(self.limits))
            self._waiting.append(row)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="batching-engine", daemon=True)
                self._thread.start()
            self._condition.notify_all()

    def _dequeue(self, row: _Row) -> bool:
        """Take ``row`` out of the waiting queue; ``False`` if it is not there (running, or already gone)."""
        with self._condition:
            if not any(waiting is row for waiting in self._waiting):
                return False
            self._waiting.remove(row)
        log.debug("batching.dequeued", reason="client left")
        return True

    def _worker_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- the engine thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        """The engine loop: admit newcomers, run one decoding step for everyone, let finished rows go."""
        with torch.inference_mode():
            while (admitted := self._admit()) is not None:
                try:
                    if admitted:
                        self._prefill(admitted)
                    self._release_done()
                    if self._batch.rows:
                        self._step()
                        self._release_done()
                except Exception as error:  # noqa: BLE001  the rows' consumers re-raise it
                    self._fail(self._batch.rows, error)
                    self._batch = _Batch()
        self._fail([*self._batch.rows, *self._drain()], GenerationError("The generator is shut down."))
        self._batch = _Batch()

    def _admit(self) -> list[_Row] | None:
        """Rows to start now (waiting while there is nothing to do); ``None`` once the engine is closed."""
        with self._condition:
            while not self._closed and not self._waiting and not self._batch.rows:
                self._condition.wait()
            if self._closed:
                return None
            admitted: list[_Row] = []
            tokens = 0
            while self._waiting and len(self._batch.rows) + len(admitted) < self.limits.max_batch_size:
                row = self._waiting[0]
                if row.cancelled.is_set():
                    _release(self._waiting.popleft())
                    continue
                to_compute = len(row.prompt_ids) - (self.prefixes.cached_tokens(row.prompt_ids) if self.prefixes else 0)
                if admitted and tokens + to_compute > self.limits.prefill_tokens:
                    break
                admitted.append(self._waiting.popleft())
                tokens += to_compute
            return admitted

    def _drain(self) -> list[_Row]:
        with self._condition:
            rows = list(self._waiting)
            self._waiting.clear()
            return rows

    def _prepare(self, row: _Row) -> None:
        """Build the row's processors and stopping criteria as ``generate`` would, and its random generator."""
        model: Any = self.model  # generate's private helpers, which nn.Module's typing hides
        prompt_length = len(row.prompt_ids)
        config = prepare_generation_config(model, row.config)  # generate's defaults (top_k=50...)
        row.config = config
        config.max_length = (config.max_new_tokens or 0) + prompt_length
        if config.min_new_tokens is not None:
            config.min_length = config.min_new_tokens + prompt_length
        config.stop_strings = list(row.params.stop) or None
        ids = torch.tensor([row.prompt_ids], dtype=torch.long, device=model.device)
        prepare_special_tokens(model, config)
        custom = LogitsProcessorList()
        if row.params.presence_penalty or row.params.frequency_penalty:
            custom.append(
                OpenAIPenalties(
                    prompt_length=prompt_length,
                    presence=row.params.presence_penalty,
                    frequency=row.params.frequency_penalty,
                )
            )
        if row.params.logprobs is not None:
            row.recorder = LogprobRecorder(row.params.logprobs)
            custom.append(row.recorder)
        row.processors = logits_processors(model, config, ids, custom)  # the same list `generate` builds
        row.stopping = stopping_criteria(model, config, self.tokenizer)
        if row.params.seed is not None and config.do_sample:
            row.rng = torch.Generator(device=model.device)
            row.rng.manual_seed(row.params.seed)
        row.ids = ids

    def _prefill(self, rows: list[_Row]) -> None:
        """Prefill newcomers in groups that fit the token budget, sample their first token, and merge them in."""
        ready: list[_Row] = []
        for row in rows:
            try:
                self._prepare(row)
            except Exception as error:  # noqa: BLE001  only this request is at fault
                self._fail([row], error)
            else:
                ready.append(row)
        ready.sort(key=lambda r: len(r.prompt_ids))
        for group in _groups(ready, 4 * self.limits.prefill_tokens):  # left padding may take a group past it
            try:
                if self.prefixes is not None:
                    for row in group:
                        row.reused = self.prefixes.match(row.prompt_ids)
                cache, mask, logits = self._prefill_group(group)
            except Exception as error:  # noqa: BLE001  the group's consumers re-raise it
                self._fail(group, error)
                continue
            self._remember_prefixes(group, cache, mask)
            reused = [_reused_tokens(row) for row in group]
            for index, row in enumerate(group):
                row.cached, row.reused = len(row.prompt_ids), []  # the blocks are in the batch's cache now
                self._advance(row, logits[index : index + 1], cached_tokens=reused[index])
            self._batch.add(group, cache, mask)
            log.debug("batching.joined", rows=len(group), running=len(self._batch.rows), reused_tokens=sum(reused))

    def _prefill_group(self, group: list[_Row]) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """One forward pass over left-padded prompts: the cache, its mask, and each row's last logits (float32).

        A row that reuses cached blocks has them copied into the cache first and computes only the rest of its
        prompt: its columns are ``[zeros | cached prefix | zeros | rest]``, the first ``width`` columns holding
        every row's prefix and the others every row's rest, both right-aligned; the mask hides the zeros.
        """
        prefix_width = max(_reused_tokens(row) for row in group)
        width = max(len(row.prompt_ids) - _reused_tokens(row) for row in group)
        device = self.model.device
        ids = torch.zeros((len(group), width), dtype=torch.long, device=device)
        mask = torch.zeros((len(group), prefix_width + width), dtype=torch.long, device=device)
        for index, row in enumerate(group):
            reused = _reused_tokens(row)
            rest = len(row.prompt_ids) - reused
            ids[index, width - rest :] = row.ids[0, reused:]
            mask[index, prefix_width - reused : prefix_width] = 1
            mask[index, prefix_width + width - rest :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, prefix_width:]
        cache = growing_cache(self.model.config)
        if prefix_width:
            cached = prefix_kv([row.reused for row in group], prefix_width).to(device)
            for layer, (keys, values) in zip(cache_layers(cache), cached, strict=True):
                layer.update(keys, values)
        logits = self._forward(ids, positions, mask, cache)
        return cache, mask, logits

    def _remember_prefixes(self, group: list[_Row], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Cache the full prompt blocks the group's rows computed and the cache does not hold yet.

        Caching is an optimisation: if it fails (a model whose layers' keys differ in shape, say), it is turned off
        and the requests go on.
        """
        prefixes = self.prefixes
        if prefixes is None:
            return
        try:
            layers = [layer_kv(layer) for layer in cache_layers(cache)]
            for index, row in enumerate(group):
                if len(row.prompt_ids) // prefixes.block_tokens <= len(row.reused):
                    continue
                columns = mask[index].nonzero().squeeze(1)
                kv = torch.stack([torch.stack([keys[index], values[index]]) for keys, values in layers])
                prefixes.insert(row.prompt_ids, row.reused, kv.index_select(3, columns))
        except Exception as error:  # noqa: BLE001  never fail a request for a cache
            log.warning("prefix_cache.disabled", error=str(error))
            prefixes.clear()
            self.prefixes = None

    def _step(self) -> None:
        """One decoding step for every running row."""
        batch = self._batch
        device = self.model.device
        last = torch.tensor([[int(row.ids[0, -1])] for row in batch.rows], dtype=torch.long, device=device)
        positions = torch.tensor([[row.cached] for row in batch.rows], dtype=torch.long, device=device)
        assert batch.mask is not None  # noqa: S101  rows always come with their mask
        mask = torch.cat([batch.mask, batch.mask.new_ones((batch.mask.shape[0], 1))], dim=1)
        logits = self._forward(last, positions, mask, batch.cache)
        batch.grow()
        for index, row in enumerate(batch.rows):
            row.cached += 1
            if not row.cancelled.is_set():
                self._advance(row, logits[index : index + 1])

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: DynamicCache | None
    ) -> torch.Tensor:
        """The model's logits for the last position of each row, as float32 (what ``generate`` samples from)."""
        tuning = (ids.shape[1] > 1, ids.numel().bit_length())  # prefill or decode, and the size of the work
        if self.threads is not None:
            threads = self.threads.pick(tuning)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        started = time.perf_counter()
        outputs = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=None if bool(mask.all()) else mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            return_dict=True,
        )
        logits: torch.Tensor = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
        if self.threads is not None:
            self.threads.record(tuning, torch.get_num_threads(), (time.perf_counter() - started) / ids.numel())
        return logits

    def _advance(self, row: _Row, logits: torch.Tensor, *, cached_tokens: int = 0) -> None:
        """Process one row's logits, pick its next token, hand it over, and check whether the row is done.

        ``cached_tokens``: on the first token, how many prompt tokens came from the prefix cache.
        """
        try:
            scores = row.processors(cast("torch.LongTensor", row.ids), cast("torch.FloatTensor", logits))
            if row.config.do_sample:
                token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=row.rng)
            else:
                token = torch.argmax(scores, dim=-1, keepdim=True)
            row.ids = torch.cat([row.ids, token.to(row.ids.dtype)], dim=-1)
            token_id = int(token)
            logprobs = () if row.recorder is None else row.recorder.logprobs_of([token_id])
            step = GeneratedTokens(token_ids=(token_id,), logprobs=logprobs, cached_tokens=cached_tokens)
            if not row.deliver(step):
                row.cancelled.set()
            if bool(row.stopping(row.ids, scores).any()):
                row.finish_reason = self._finish_reason(row)
        except Exception as error:  # noqa: BLE001  only this request is at fault
            self._fail([row], error)

    def _finish_reason(self, row: _Row) -> FinishReason:
        """``LENGTH`` when the token budget ran out on something other than an end-of-sequence token."""
        ran_out = row.generated >= (row.config.max_new_tokens or 0)
        ended = int(row.ids[0, -1]) in self.eos_token_ids
        return FinishReason.LENGTH if ran_out and not ended else FinishReason.STOP

    def _release_done(self) -> None:
        """Hand finished rows their finish reason and drop them, with abandoned ones, from the batch."""
        keep = []
        for index, row in enumerate(self._batch.rows):
            if not row.done:
                keep.append(index)
                continue
            if row.finish_reason is not None and not row.cancelled.is_set():
                row.deliver(GeneratedTokens(finish_reason=row.finish_reason))
            _release(row)
        if len(keep) < len(self._batch.rows):
            self._batch.keep(keep)
            log.debug("batching.left", running=len(self._batch.rows))

    def _fail(self, rows: Sequence[_Row], error: Exception) -> None:
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
            _release(row)


def _reused_tokens(row: _Row) -> int:
    """How many prompt tokens of ``row`` come from the prefix cache."""
    return sum(len(block.tokens) for block in row.reused)


def _release(row: _Row) -> None:
    """Tell the row's consumer, once, that the engine has let go of it."""
    if not row.released:
        row.released = True
        row.deliver(None)


def _groups(rows: list[_Row], budget: int) -> list[list[_Row]]:
    """Split rows (sorted by prompt length) into groups whose padded prompts fit ``budget`` tokens."""
    groups: list[list[_Row]] = []
    current: list[_Row] = []
    for row in rows:
        if current and (len(current) + 1) * len(row.prompt_ids) > budget:
            groups.append(current)
            current = []
        current.append(row)
    if current:
        groups.append(current)
    return groups


def _deliverer(
    loop: asyncio.AbstractEventLoop, steps: asyncio.Queue[GeneratedTokens | BaseException | None]
) -> Callable[[GeneratedTokens | BaseException | None], bool]:
    """A thread-safe ``put`` onto ``steps``; it returns ``False`` once the event loop is gone."""

    def deliver(item: GeneratedTokens | BaseException | None) -> bool:
        try:
            loop.call_soon_threadsafe(steps.put_nowait, item)
        except RuntimeError:
            return False
        return True

    return deliver


def _queue_full_message(limits: BatchLimits) -> str:
    return (
        f"The server is busy: {limits.max_batch_size} requests are generating and {limits.max_queue} are waiting. "
        "Retry shortly."
    )


__all__ = ["BatchLimits", "BatchingGenerator"]
