"""The engine replica as a Ray Serve deployment: an ``EngineReplica`` behind Serve's methods, no HTTP."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from typing import Any

from adapters.ray.replica import EngineReplica
from adapters.ray.wire import WireStep
from domain.generation import GenerationParams


class EngineDeployment:
    """One engine replica (model, batching engine, prefix cache), built in the replica's process by ``build``.

    The composition root wraps it with ``serve.deployment`` (replicas, resources, router). Ray calls
    ``record_routing_stats`` periodically and hands the result to the routers, which put it on ``/metrics``.
    """

    def __init__(self, build: Callable[[], EngineReplica]) -> None:
        self.replica = build()

    async def generate(
        self, prompt_ids: Sequence[int], params: GenerationParams, prefix: Sequence[int] = ()
    ) -> AsyncGenerator[list[WireStep], None]:
        """The generation's steps as plain data, in batches (call it with ``handle.options(stream=True)``)."""
        async for item in self.replica.generate(prompt_ids, params, prefix):
            yield item

    async def score(self, token_ids: Sequence[int], top: int) -> WireStep:
        """Log-probabilities of ``token_ids[1:]`` as plain data."""
        return await self.replica.score(token_ids, top)

    def facts(self) -> dict[str, Any]:
        """The model's facts and its tokenizer, for the ingress to tokenize and template with."""
        return {"facts": self.replica.facts.to_wire(), "tokenizer": self.replica.tokenizer}

    def record_routing_stats(self) -> dict[str, int]:
        """The replica's load and cache (Ray's routing-stats hook)."""
        return self.replica.stats()

    def __del__(self) -> None:
        """Stop the engine when Serve lets the replica go."""
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.close()
