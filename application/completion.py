"""The (legacy) text completion use case."""

from __future__ import annotations

import contextlib

import attrs

from application.generation import TextGeneration, complete
from domain.generation import Completion, CompletionStream, GenerationParams, TextDelta

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for ``/v1/completions``."""


@attrs.define
class CompletionService:
    """Continues a raw prompt, optionally echoing it back in front of the continuation."""

    generation: TextGeneration

    def stream(self, prompt: str, params: GenerationParams, *, echo: bool = False) -> CompletionStream:
        """Check the request now, then stream the continuation (after the prompt when ``echo``) and the ``Completion``.

        Errors in the request (context length) are raised by this call, before anything is generated.
        """
        tokens = self.generation.tokenize(prompt, add_special_tokens=True)
        params = self.generation.budget(tokens, params, default_max_tokens=DEFAULT_MAX_TOKENS)
        events = self.generation.stream(tokens, params)
        return _echoed(prompt, events) if echo else events

    async def complete(self, prompt: str, params: GenerationParams, *, echo: bool = False) -> Completion:
        """The whole continuation at once."""
        return await complete(self.stream(prompt, params, echo=echo))


async def _echoed(prompt: str, events: CompletionStream) -> CompletionStream:
    """``events`` with the prompt in front of the text."""
    yield TextDelta(prompt)
    async with contextlib.aclosing(events):
        async for event in events:
            yield attrs.evolve(event, text=prompt + event.text) if isinstance(event, Completion) else event
