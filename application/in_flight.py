"""A ``Generator`` that knows whether it is in use: what a server with many models unloads only when idle."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Iterator, Sequence

import attrs

from domain.generation import GeneratedTokens, GenerationParams, TokenLogprob
from domain.ports import Generator


@attrs.define
class InFlight:
    """``inner`` behind the ``Generator`` port, counting the generations, scorings and holds running through it."""

    inner: Generator
    running: int = 0
    last_active: float = attrs.field(factory=time.monotonic)
    """When it was last used (``time.monotonic``): a request started or ended."""

    @property
    def model_id(self) -> str:
        """The inner generator's model name."""
        return self.inner.model_id

    @property
    def context_length(self) -> int:
        """The inner generator's context window."""
        return self.inner.context_length

    @property
    def vocab_size(self) -> int:
        """The inner generator's vocabulary size."""
        return self.inner.vocab_size

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``."""
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        """Text of ``token_ids``."""
        return self.inner.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """The tokenizer's own string for each token."""
        return self.inner.token_strings(token_ids)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Count as in use while the block runs (a request that will generate but has not started yet)."""
        self.running += 1
        self.last_active = time.monotonic()
        try:
            yield
        finally:
            self.running -= 1
            self.last_active = time.monotonic()

    async def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams
    ) -> AsyncGenerator[GeneratedTokens, None]:
        """The inner generator's stream, counted as in use until it ends or is closed."""
        with self.hold():
            async with contextlib.aclosing(self.inner.generate(prompt_ids, params)) as steps:
                async for step in steps:
                    yield step

    async def score(self, token_ids: Sequence[int], *, top: int) -> list[TokenLogprob]:
        """The inner generator's scores, counted as in use meanwhile."""
        with self.hold():
            return await self.inner.score(token_ids, top=top)


__all__ = ["InFlight"]
