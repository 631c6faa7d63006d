"""The engine replica's logic, without Ray: one ``Generator`` answering in plain data, counting its load."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import attrs

from adapters.ray.wire import WireStep, error_to_wire, logprob_to_wire, step_to_wire
from domain.errors import DomainError
from domain.generation import GenerationParams
from domain.ports import Generator


@attrs.frozen
class EngineFacts:
    """What the ingress needs to know of the replicas' model to tokenize, template and check requests itself."""

    model_id: str
    context_length: int
    vocab_size: int
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    eos_token_ids: tuple[int, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """The facts as plain data."""
        return attrs.asdict(self)

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> EngineFacts:
        """The facts back from plain data."""
        return cls(**{**data, "eos_token_ids": tuple(data.get("eos_token_ids", ()))})


@attrs.define
class EngineReplica:
    """A ``Generator`` behind a replica: steps and errors as plain data, and how many requests it holds.

    No HTTP and no Ray here: the Serve deployment calls these methods, the fast tests call them directly.
    """

    generator: Generator
    facts: EngineFacts
    tokenizer: object | None = None
    """The tokenizer object the ingress tokenizes with (it pickles; ``None`` where the ingress has its own)."""
    cache_bytes: Callable[[], int] = lambda: 0
    """Memory the prefix cache holds now."""
    close: Callable[[], None] = lambda: None
    waiting: int = 0
    """Requests accepted that have produced nothing yet."""
    running: int = 0
    """Requests producing tokens now."""

    async def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams, prefix: Sequence[int] = ()
    ) -> AsyncGenerator[WireStep, None]:
        """Stream the generation's steps; a domain error ends the stream as an error item.

        ``prefix`` (the prompt's block keys) is the router's, not the engine's. Closing the stream closes the
        generator's, which stops generation within a step.
        """
        del prefix
        self.waiting += 1
        started = False
        try:
            async with contextlib.aclosing(self.generator.generate(prompt_ids, params)) as steps:
                async for step in steps:
                    if not started:
                        started = True
                        self.waiting -= 1
                        self.running += 1
                    yield step_to_wire(step)
        except DomainError as error:
            yield error_to_wire(error)
        finally:
            if started:
                self.running -= 1
            else:
                self.waiting -= 1

    async def score(self, token_ids: Sequence[int], top: int) -> WireStep:
        """``{"logprobs": [...]}`` of each of ``token_ids[1:]``, or ``{"error": ...}``."""
        try:
            scored = await self.generator.score(token_ids, top=top)
        except DomainError as error:
            return error_to_wire(error)
        return {"logprobs": [logprob_to_wire(item) for item in scored]}

    def stats(self) -> dict[str, int]:
        """The replica's load and cache, for the router and ``/metrics``."""
        return {"running": self.running, "waiting": self.waiting, "prefix_cache_bytes": self.cache_bytes()}
