"""The (legacy) text completion use case."""

from __future__ import annotations

from collections.abc import AsyncIterator

import attrs

from application.generation import TextGeneration, complete
from domain.generation import Completion, GenerationParams, TextDelta

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for ``/v1/completions``."""


@attrs.define
class CompletionService:
    """Continues a raw prompt, optionally echoing it back in front of the continuation."""

    generation: TextGeneration

    async def stream(
        self, prompt: str, params: GenerationParams, *, echo: bool = False
    ) -> AsyncIterator[TextDelta | Completion]:
        """Yield the continuation as it is produced (after the prompt when ``echo``), then the ``Completion``."""
        tokens = self.generation.tokenize(prompt, add_special_tokens=True)
        params = self.generation.budget(tokens, params, default_max_tokens=DEFAULT_MAX_TOKENS)
        if echo:
            yield TextDelta(prompt)
        async for event in self.generation.stream(tokens, params):
            if echo and isinstance(event, Completion):
                event = attrs.evolve(event, text=prompt + event.text)
            yield event

    async def complete(self, prompt: str, params: GenerationParams, *, echo: bool = False) -> Completion:
        """The whole continuation at once."""
        return await complete(self.stream(prompt, params, echo=echo))
