"""The generation loop both use cases share: budget the tokens, stream text, honour stop sequences, count usage."""

from __future__ import annotations

import contextlib

import attrs
import structlog

from application.decoding import IncrementalDecoder
from domain.errors import ContextLengthExceededError
from domain.generation import Completion, CompletionStream, FinishReason, GenerationParams, TextDelta, Usage
from domain.ports import Generator, StopPolicy

log = structlog.get_logger(__name__)


@attrs.frozen
class Prompt:
    """A prompt ready for the model: its text and its token ids."""

    text: str
    token_ids: tuple[int, ...]


@attrs.define
class TextGeneration:
    """Runs one prompt through the generator and turns its tokens into clean text and exact usage."""

    generator: Generator
    stop_policy: StopPolicy
    log_content: bool = True

    def tokenize(self, text: str, *, add_special_tokens: bool) -> Prompt:
        """Encode ``text`` and log its token ids."""
        token_ids = tuple(self.generator.encode(text, add_special_tokens=add_special_tokens))
        self._log("prompt.tokenized", prompt=text, input_ids=list(token_ids), prompt_tokens=len(token_ids))
        return Prompt(text=text, token_ids=token_ids)

    def budget(self, prompt: Prompt, params: GenerationParams, *, default_max_tokens: int | None) -> GenerationParams:
        """``params`` with ``max_new_tokens`` set, checked against the context window."""
        context = self.generator.context_length
        prompt_tokens = len(prompt.token_ids)
        room = context - prompt_tokens
        requested = params.max_new_tokens if params.max_new_tokens is not None else default_max_tokens
        if room <= 0 or (requested is not None and requested > room):
            completion = requested if requested is not None else 1
            message = (
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + completion} tokens ({prompt_tokens} in the prompt, {completion} in the "
                "completion). Please reduce the length of the prompt or the completion."
            )
            raise ContextLengthExceededError(message, param="max_tokens" if room > 0 else "messages")
        return attrs.evolve(params, max_new_tokens=requested if requested is not None else room)

    async def stream(self, prompt: Prompt, params: GenerationParams) -> CompletionStream:
        """Yield text deltas as they become certain, then the finished ``Completion``.

        Text that might be the start of a stop sequence is held back until it is known not to be one; once a
        stop sequence appears, generation is stopped and the sequence never reaches the client.
        """
        stops = self.stop_policy.sequences(params.stop)
        params = attrs.evolve(params, stop=stops)
        decoder = IncrementalDecoder(self.generator)
        text = ""
        released = 0
        finish_reason = FinishReason.STOP
        async with contextlib.aclosing(self.generator.generate(prompt.token_ids, params)) as steps:
            async for step in steps:
                text += decoder.push(step.token_ids)
                if step.finish_reason is not None:
                    finish_reason = step.finish_reason
                    text += decoder.flush()
                cut = self.stop_policy.find(text, stops)
                if cut is not None:
                    text, finish_reason = text[:cut], FinishReason.STOP
                    break
                safe = len(text) if step.finish_reason is not None else self.stop_policy.safe_length(text, stops)
                if safe > released:
                    yield TextDelta(text[released:safe])
                    released = safe
        if len(text) > released:
            yield TextDelta(text[released:])
        generated = decoder.token_ids
        usage = Usage(prompt_tokens=len(prompt.token_ids), completion_tokens=len(generated))
        self._log(
            "generation.finished",
            generated_ids=list(generated),
            raw_text=self.generator.decode(generated, skip_special_tokens=False),
            response=text,
        )
        log.info(
            "usage",
            finish_reason=str(finish_reason),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
        )
        yield Completion(text=text, finish_reason=finish_reason, usage=usage)

    def _log(self, event: str, **content: object) -> None:
        """Log ``event`` with its content, or with none of it when content logging is off."""
        log.info(event, **(content if self.log_content else {}))


async def complete(events: CompletionStream) -> Completion:
    """Drain a stream and return its ``Completion``."""
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, Completion):
                return event
    msg = "generation stream ended without a completion"
    raise RuntimeError(msg)
