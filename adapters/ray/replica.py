"""The engine replica's logic, without Ray: one ``Generator`` answering in plain data, counting its load."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

import attrs

from adapters.ray.wire import WireStep, error_to_wire, logprob_to_wire, step_to_wire
from domain.errors import DomainError
from domain.generation import GeneratedTokens, GenerationParams
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
    draft_tokens: Callable[[], tuple[int, int]] = lambda: (0, 0)
    """Speculative decoding's draft tokens so far: (proposed, accepted)."""
    waiting: int = 0
    """Requests accepted that have produced nothing yet."""
    running: int = 0
    """Requests producing tokens now."""

    async def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams, prefix: Sequence[int] = ()
    ) -> AsyncGenerator[list[WireStep], None]:
        """Stream the generation's steps, in batches of those ready; a domain error ends it as an error item.

        Each item is every step produced since the previous one: one remote item per token would make the transport,
        not the model, the bottleneck when the consumer is slower than the engine. ``prefix`` (the prompt's block
        keys) is the router's, not the engine's. Closing the stream stops generation within a step.
        """
        del prefix
        ready: asyncio.Queue[WireStep | None] = asyncio.Queue()
        pump = asyncio.create_task(self._pump(self.generator.generate(prompt_ids, params), ready))
        try:
            while True:
                batch = [await ready.get()]
                while not ready.empty():
                    batch.append(ready.get_nowait())
                steps = [step for step in batch if step is not None]
                if steps:
                    yield steps
                if len(steps) < len(batch):
                    return
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump

    async def _pump(self, steps: AsyncGenerator[GeneratedTokens, None], ready: asyncio.Queue[WireStep | None]) -> None:
        """Put the generation's steps on ``ready`` as they come, then ``None``; count the request's load meanwhile."""
        self.waiting += 1
        started = False
        try:
            async with contextlib.aclosing(steps):
                async for step in steps:
                    if not started:
                        started = True
                        self.waiting -= 1
                        self.running += 1
                    ready.put_nowait(step_to_wire(step))
        except DomainError as error:
            ready.put_nowait(error_to_wire(error))
        finally:
            if started:
                self.running -= 1
            else:
                self.waiting -= 1
            ready.put_nowait(None)

    async def score(self, token_ids: Sequence[int], top: int) -> WireStep:
        """``{"logprobs": [...]}`` of each of ``token_ids[1:]``, or ``{"error": ...}``."""
        try:
            scored = await self.generator.score(token_ids, top=top)
        except DomainError as error:
            return error_to_wire(error)
        return {"logprobs": [logprob_to_wire(item) for item in scored]}

    def stats(self) -> dict[str, int]:
        """The replica's load, cache and draft token counts, for the router and ``/metrics``."""
        proposed, accepted = self.draft_tokens()
        return {
            "running": self.running,
            "waiting": self.waiting,
            "prefix_cache_bytes": self.cache_bytes(),
            "draft_tokens": proposed,
            "accepted_tokens": accepted,
        }
