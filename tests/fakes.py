"""Hand-written fakes for the domain ports."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Sequence

import attrs

from domain.errors import GenerationError
from domain.generation import FinishReason, GeneratedTokens, GenerationParams, TokenLogprob
from domain.options import read_options

EOS = 0


def generation_params(**fields: object) -> GenerationParams:
    """``GenerationParams`` from flat fields, as a request names them: the table's options go through its checks."""
    own = {field.name for field in attrs.fields(GenerationParams)}
    options, extra = read_options({name: value for name, value in fields.items() if name not in own})
    named = {name: value for name, value in fields.items() if name in own}
    named["extra"] = {**named.get("extra", {}), **extra}  # type: ignore[dict-item]
    return GenerationParams(**named, options=options)  # type: ignore[arg-type]


@attrs.define
class FakeGenerator:
    """A byte-level "model" that answers ``reply`` one byte-token at a time, then EOS.

    Token ids are UTF-8 bytes plus one, so multi-byte characters span several tokens, as with real BPE models.
    It records each call and how many tokens it produced, so tests can assert on what reached the model.
    """

    reply: str = "Hello! I am a fake model."
    model_id: str = "fake-model"
    context_length: int = 4096
    vocab_size: int = 257
    step_delay: float = 0.0
    calls: list[tuple[tuple[int, ...], GenerationParams]] = attrs.Factory(list)
    fail_after: int | None = None
    produced: int = 0
    closed_early: int = 0
    scored: list[tuple[int, ...]] = attrs.Factory(list)
    cached_tokens: int = 0
    """What the first step says a prefix cache held of the prompt (at most the prompt but its last token)."""
    replies: list[str] = attrs.Factory(list)
    """Answers for the next calls, one each, in order; ``reply`` once they are used up (a scripted conversation)."""
    hold: threading.Event | None = None
    """When given, every token after the first waits until it is set (a stream a test keeps open)."""

    def prompt_text(self, call: int = -1) -> str:
        """The prompt of a recorded call, as text."""
        return self.decode(self.calls[call][0], skip_special_tokens=True)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        del add_special_tokens
        return [byte + 1 for byte in text.encode()]

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        text = bytes(i - 1 for i in token_ids if i != EOS).decode(errors="replace")
        ends = sum(1 for i in token_ids if i == EOS)
        return text if skip_special_tokens else text + "</s>" * ends

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """The vocabulary's own strings, as BPE tokenizers write them: ``Ġ`` for a space, ``<0xNN>`` for other bytes."""
        return [_token_string(token) for token in token_ids]

    async def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams
    ) -> AsyncGenerator[GeneratedTokens, None]:
        self.calls.append((tuple(prompt_ids), params))
        if self.replies:
            self.reply = self.replies.pop(0)
        budget = params.max_new_tokens if params.max_new_tokens is not None else self.context_length
        tokens = [*self.encode(self.reply, add_special_tokens=False), EOS]
        finished = False
        try:
            for count, token in enumerate(tokens, start=1):
                if count > budget:
                    finished = True
                    yield GeneratedTokens(finish_reason=FinishReason.LENGTH)
                    return
                if self.step_delay:
                    await asyncio.sleep(self.step_delay)
                while self.hold is not None and count > 1 and not self.hold.is_set():  # noqa: ASYNC110  a thread's event
                    await asyncio.sleep(0.01)
                if self.fail_after is not None and count > self.fail_after:
                    msg = "the fake model broke down"
                    raise GenerationError(msg)
                self.produced += 1
                logprobs = () if params.logprobs is None else (fake_logprob(token, params.logprobs),)
                cached = min(self.cached_tokens, len(prompt_ids) - 1) if count == 1 else 0
                yield GeneratedTokens((token,), logprobs=logprobs, cached_tokens=cached)
            finished = True
            yield GeneratedTokens(finish_reason=FinishReason.STOP)
        finally:
            if not finished:
                self.closed_early += 1

    async def score(self, token_ids: Sequence[int], *, top: int) -> list[TokenLogprob]:
        self.scored.append(tuple(token_ids))
        return [fake_logprob(token, top) for token in token_ids[1:]]


def _token_string(token: int) -> str:
    if token == EOS:
        return "</s>"
    byte = token - 1
    if byte == ord(" "):
        return "\u0120"
    return chr(byte) if 0x21 <= byte < 0x7F else f"<0x{byte:02X}>"


def fake_logprob(token: int, top: int) -> TokenLogprob:
    """A made-up but deterministic log-probability: ``-(token % 7 + 1) / 10``; alternatives follow the token."""
    value = -(token % 7 + 1) / 10
    alternatives = ((token, value), *(((token + k) % 256 + 1, value - k) for k in range(1, top)))
    return TokenLogprob(token, value, alternatives[:top])
