"""The generation loop the use cases share: budget tokens, stream text, honour stop sequences, count usage."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Sequence

import attrs
import structlog

from application.decoding import IncrementalDecoder
from domain.errors import ContextLengthExceededError, InvalidRequestError
from domain.generation import (
    Choice,
    Completion,
    CompletionStream,
    FinishReason,
    GeneratedTokens,
    GenerationParams,
    LogprobEntry,
    TextDelta,
    TokenLogprob,
    Usage,
)
from domain.ports import ConstraintChecker, Generator, StopPolicy

log = structlog.get_logger(__name__)

CONTENT = frozenset({"prompt", "input_ids", "generated_ids", "raw_text", "response"})
"""Logged fields that hold what users wrote or the model said; ``--no-log-content`` leaves them out."""

ChoiceStream = AsyncGenerator[TextDelta | Choice, None]


@attrs.frozen
class Prompt:
    """A prompt ready for the model: its text and its token ids."""

    text: str
    token_ids: tuple[int, ...]


@attrs.frozen
class ChoiceJob:
    """One choice to generate: which prompt, with which parameters, at which index, echoing the prompt or not."""

    prompt: Prompt
    params: GenerationParams
    index: int = 0
    echo: bool = False


@attrs.define
class TextGeneration:
    """Runs prompts through the generator and turns their tokens into clean text, logprobs and exact usage."""

    generator: Generator
    stop_policy: StopPolicy
    log_content: bool = True
    constraints: ConstraintChecker | None = None
    """Checks output constraints (``response_format``, forced tool calls) before generating; none: unchecked."""

    def tokenize(self, text: str, *, add_special_tokens: bool) -> Prompt:
        """Encode ``text`` and log its token ids."""
        token_ids = tuple(self.generator.encode(text, add_special_tokens=add_special_tokens))
        self._log("prompt.tokenized", prompt=text, input_ids=list(token_ids), prompt_tokens=len(token_ids))
        return Prompt(text=text, token_ids=token_ids)

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` takes (without special tokens)."""
        return len(self.generator.encode(text, add_special_tokens=False))

    def from_token_ids(self, token_ids: Sequence[int]) -> Prompt:
        """A prompt given as token ids (the completions API allows it)."""
        vocabulary = self.generator.vocab_size
        outside = [token for token in token_ids if not 0 <= token < vocabulary]
        if outside:
            msg = f"prompt holds token ids outside the vocabulary [0, {vocabulary}): {outside[:10]}"
            raise InvalidRequestError(msg, param="prompt")
        text = self.generator.decode(token_ids, skip_special_tokens=False)
        self._log("prompt.tokenized", prompt=text, input_ids=list(token_ids), prompt_tokens=len(token_ids))
        return Prompt(text=text, token_ids=tuple(token_ids))

    def budget(self, prompt: Prompt, params: GenerationParams, *, default_max_tokens: int | None) -> GenerationParams:
        """``params`` with ``max_new_tokens`` set; tokens checked against the context, biases against the vocab."""
        context = self.generator.context_length
        prompt_tokens = len(prompt.token_ids)
        room = context - prompt_tokens
        vocabulary = self.generator.vocab_size
        words = params.options.get("bad_words_ids", ())
        for param, tokens in (
            ("logit_bias", params.logit_bias),
            ("stop_token_ids", params.stop_token_ids),
            ("allowed_token_ids", params.allowed_token_ids or ()),
            ("bad_words_ids", [token for word in words for token in word]),  # type: ignore[attr-defined]
        ):
            outside = [token for token in tokens if not 0 <= token < vocabulary]
            if outside:
                msg = f"{param} names token ids outside the vocabulary [0, {vocabulary}): {outside}"
                raise InvalidRequestError(msg, param=param)
        requested = params.max_new_tokens if params.max_new_tokens is not None else default_max_tokens
        if room < 0 or (requested is None and room == 0) or (requested is not None and requested > room):
            completion = requested if requested is not None else 1
            message = (
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + completion} tokens ({prompt_tokens} in the prompt, {completion} in the "
                "completion). Please reduce the length of the prompt or the completion."
            )
            raise ContextLengthExceededError(message, param="max_tokens" if room > 0 else "messages")
        return attrs.evolve(params, max_new_tokens=requested if requested is not None else room)

    def run(self, jobs: Sequence[ChoiceJob]) -> CompletionStream:
        """Generate every choice concurrently; stream their deltas and ends, then the ``Completion`` with usage.

        Prompt tokens count once per distinct prompt, completion tokens once per choice, as OpenAI counts them.
        An output constraint that cannot be enforced is rejected by this call, before anything is generated.
        """
        if self.constraints is not None:
            for constraint in {id(c): c for job in jobs if (c := job.params.constraint) is not None}.values():
                self.constraints.check(constraint)
        return self._run(list(jobs))

    async def _run(self, jobs: list[ChoiceJob]) -> CompletionStream:
        prompt_tokens = sum(len(p.token_ids) for p in {id(job.prompt): job.prompt for job in jobs}.values())
        choices: dict[int, Choice] = {}
        echoed = {id(job.prompt): job for job in jobs if job.echo}
        echoes = {key: await self._echo(job) for key, job in echoed.items()}  # each prompt is scored once
        scored = {id(job.prompt): job for job in jobs if job.params.prompt_logprobs is not None}
        prompt_logprobs = {key: await self._prompt_logprobs(job) for key, job in scored.items()}
        streams = [self.stream_choice(job, echoes.get(id(job.prompt), ("", ()))) for job in jobs]
        merged = streams[0] if len(streams) == 1 else _merge(streams)
        by_index = {job.index: id(job.prompt) for job in jobs}
        async with contextlib.aclosing(merged):
            async for event in merged:
                if isinstance(event, Choice):
                    if (entries := prompt_logprobs.get(by_index[event.index])) is not None:
                        event = attrs.evolve(event, prompt_logprobs=entries)  # noqa: PLW2901
                    choices[event.index] = event
                yield event
        ordered = tuple(choices[index] for index in sorted(choices))
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=sum(c.completion_tokens for c in ordered),
            cached_tokens=_cached_tokens(jobs, choices),
        )
        log.info(
            "usage",
            finish_reasons=[str(c.finish_reason) for c in ordered],
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        )
        yield Completion(choices=ordered, usage=usage)

    async def stream_choice(
        self, job: ChoiceJob, echoed: tuple[str, tuple[LogprobEntry, ...]] = ("", ())
    ) -> ChoiceStream:
        """One choice after the ``echoed`` prompt and its logprobs: deltas as text becomes certain, then the ``Choice``.

        Text that might be the start of a stop sequence is held back until it is known not to be one; once a stop
        sequence appears, generation is stopped and the sequence never reaches the client.
        """
        params = attrs.evolve(job.params, stop=self.stop_policy.sequences(job.params.stop))
        stops = params.stop
        prefix, prefix_logprobs = echoed
        prompt_tokens = len(job.prompt.token_ids)
        if prefix:
            yield TextDelta(prefix, job.index, prefix_logprobs, prompt_tokens=prompt_tokens)
        decoder = IncrementalDecoder(self.generator)
        entries: list[LogprobEntry] = []
        text = ""
        released = sent = 0
        finish_reason = FinishReason.LENGTH
        cut = None
        matched: str | None = None
        cached = 0
        if params.max_new_tokens != 0:
            async with contextlib.aclosing(
                one_token_each(self.generator.generate(job.prompt.token_ids, params))
            ) as steps:
                async for step in steps:
                    cached = max(cached, step.cached_tokens)
                    if params.logprobs is not None:
                        offset = len(prefix) + len(text)
                        entries.extend(self._entry(logprob, offset) for logprob in step.logprobs)
                    text += decoder.push(step.token_ids)
                    if step.finish_reason is not None:
                        finish_reason = step.finish_reason
                        text += decoder.flush()
                    cut = self.stop_policy.find(text, stops)
                    if cut is not None:
                        matched = max((s for s in stops if text.startswith(s, cut)), key=len, default=None)
                        text, finish_reason = text[:cut], FinishReason.STOP
                        break
                    safe = len(text) if step.finish_reason is not None else self.stop_policy.safe_length(text, stops)
                    if safe > released:
                        ready = [e for e in entries[sent:] if e.offset < len(prefix) + safe]
                        so_far = len(decoder.token_ids)
                        yield TextDelta(text[released:safe], job.index, tuple(ready), (), prompt_tokens, so_far)
                        released, sent = safe, sent + len(ready)
        final = entries if cut is None else [e for e in entries if e.offset < len(prefix) + len(text)]
        rest = tuple(final[sent:])
        if len(text) > released or rest:
            yield TextDelta(text[released:], job.index, rest, (), prompt_tokens, len(decoder.token_ids))
        generated = decoder.token_ids
        self._log(
            "generation.finished",
            index=job.index,
            generated_ids=list(generated),
            raw_text=self.generator.decode(generated, skip_special_tokens=False),
            response=text,
        )
        logprobs = None if params.logprobs is None else (*prefix_logprobs, *final)
        yield Choice(
            prefix + text,
            finish_reason,
            job.index,
            logprobs,
            completion_tokens=len(generated),
            cached_tokens=cached,
            stop_sequence=matched,
        )

    async def _echo(self, job: ChoiceJob) -> tuple[str, tuple[LogprobEntry, ...]]:
        """The echoed prompt and, when logprobs are asked for, its own tokens' logprobs (the first has none)."""
        if not job.echo:
            return "", ()
        if job.params.logprobs is None:
            return job.prompt.text, ()
        return job.prompt.text, await self._scored_prompt(job, job.params.logprobs)

    async def _prompt_logprobs(self, job: ChoiceJob) -> tuple[LogprobEntry, ...]:
        """The prompt's own tokens' logprobs with ``prompt_logprobs`` alternatives (vLLM's; the first has none)."""
        return await self._scored_prompt(job, job.params.prompt_logprobs or 0)

    async def _scored_prompt(self, job: ChoiceJob, top: int) -> tuple[LogprobEntry, ...]:
        ids = job.prompt.token_ids
        scored = await self.generator.score(ids, top=top)
        offsets = _offsets(self.generator, ids)
        first = LogprobEntry(self._token(ids[0]), None, 0, token_id=ids[0]) if ids else None
        rest = [self._entry(lp, offsets[i + 1]) for i, lp in enumerate(scored)]
        return tuple([first, *rest] if first else rest)

    def _entry(self, logprob: TokenLogprob, offset: int) -> LogprobEntry:
        top = tuple((self._token(token), value) for token, value in logprob.top)
        return LogprobEntry(
            self._token(logprob.token_id),
            logprob.logprob,
            offset,
            top,
            token_id=logprob.token_id,
            top_ids=tuple(token for token, _ in logprob.top),
            rank=logprob.rank,
        )

    def _token(self, token_id: int) -> str:
        return self.generator.decode([token_id], skip_special_tokens=False)

    def _log(self, event: str, **fields: object) -> None:
        """Log ``event``; when content logging is off, without its texts and token ids (counts stay)."""
        log.info(event, **(fields if self.log_content else {k: v for k, v in fields.items() if k not in CONTENT}))


async def one_token_each(steps: AsyncGenerator[GeneratedTokens, None]) -> AsyncGenerator[GeneratedTokens, None]:
    """``steps`` with each step of several tokens (a speculative draft's) split into one step per token.

    Stop sequences, text offsets of logprobs and usage then come out as they do when tokens arrive one by one:
    nothing after the token that completes a stop sequence is counted. Closing this stream closes ``steps``.
    """
    async with contextlib.aclosing(steps):
        async for step in steps:
            if len(step.token_ids) <= 1:
                yield step
                continue
            last = len(step.token_ids) - 1
            for index, token in enumerate(step.token_ids):
                yield GeneratedTokens(
                    token_ids=(token,),
                    finish_reason=step.finish_reason if index == last else None,
                    logprobs=step.logprobs[index : index + 1],
                    cached_tokens=step.cached_tokens,
                )


def _cached_tokens(jobs: Sequence[ChoiceJob], choices: dict[int, Choice]) -> int:
    """Cached prompt tokens, counted as prompt tokens are: once per distinct prompt (the least its choices read)."""
    by_prompt: dict[int, list[int]] = {}
    for job in jobs:
        if job.index in choices:
            by_prompt.setdefault(id(job.prompt), []).append(choices[job.index].cached_tokens)
    return sum(min(counts) for counts in by_prompt.values())


def _offsets(generator: Generator, token_ids: Sequence[int]) -> list[int]:
    """Where each token's text starts in the decoded text of ``token_ids`` (one pass, constant work per token)."""
    decoder = IncrementalDecoder(generator, skip_special_tokens=False)
    offsets, length = [], 0
    for token in token_ids:
        offsets.append(length)
        length += len(decoder.push([token]))
    return offsets


async def _merge(streams: list[ChoiceStream]) -> AsyncGenerator[TextDelta | Choice, None]:
    """Interleave several choice streams as their events arrive; closing the merge closes them all."""
    queue: asyncio.Queue[TextDelta | Choice | BaseException | None] = asyncio.Queue()

    async def pump(stream: ChoiceStream) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for event in stream:
                    await queue.put(event)
        except Exception as error:  # noqa: BLE001  handed to the consumer, who re-raises it
            await queue.put(error)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def complete(events: CompletionStream) -> Completion:
    """Drain a stream and return its ``Completion``."""
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, Completion):
                return event
    msg = "generation stream ended without a completion"
    raise RuntimeError(msg)
