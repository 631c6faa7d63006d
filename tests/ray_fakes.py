"""In-process stand-ins for Ray's handle: engine replicas over FakeGenerators, routed by the real prefix table."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any

import attrs

from adapters.ray.board import ReplicaBoard
from adapters.ray.replica import EngineFacts, EngineReplica
from adapters.ray.wire import ReplicaUnavailableError
from domain.generation import GenerationParams
from tests.fakes import FakeGenerator


def fake_replica(fake: FakeGenerator) -> EngineReplica:
    facts = EngineFacts(fake.model_id, fake.context_length, fake.vocab_size)
    return EngineReplica(fake, facts)


@attrs.define
class FakeReplicaStream:
    """One generation on a fake replica; ``dies_after`` items, the replica is lost (as a killed Ray actor)."""

    steps: AsyncGenerator[list[dict[str, Any]], None]
    dies_after: int | None = None
    cancelled: bool = False
    _closing: list[asyncio.Task[None]] = attrs.field(factory=list)

    async def __aiter__(self) -> AsyncIterator[list[Mapping[str, Any]]]:
        count = 0
        async for batch in self.steps:
            for item in batch:
                if self.dies_after is not None and count >= self.dies_after:
                    await self.steps.aclose()
                    msg = "the engine replica died"
                    raise ReplicaUnavailableError(msg)
                count += 1
                yield [item]

    def cancel(self) -> None:
        self.cancelled = True
        self._closing.append(asyncio.ensure_future(self.steps.aclose()))


@attrs.define
class FakeReplicas:
    """The ``ReplicaClient`` port over in-process replicas, choosing among them as the Ray router does."""

    replicas: dict[str, EngineReplica]
    board: ReplicaBoard = attrs.field(factory=ReplicaBoard)
    routed: list[str] = attrs.field(factory=list)
    streams: list[FakeReplicaStream] = attrs.field(factory=list)
    dies_after: int | None = None
    dying_streams: int | None = None
    """How many of the first streams die after ``dies_after`` items (``None``: all)."""

    def generate(self, prompt_ids: list[int], params: GenerationParams, prefix: tuple[int, ...]) -> FakeReplicaStream:
        loads = {name: replica.running + replica.waiting for name, replica in self.replicas.items()}
        if not loads:
            msg = "no engine replica is running"
            raise ReplicaUnavailableError(msg)
        chosen = self.board.affinity.choose(prefix, loads)
        self.board.affinity.record(prefix, chosen)
        self.routed.append(chosen)
        dies = self.dying_streams is None or len(self.streams) < self.dying_streams
        stream = FakeReplicaStream(
            self.replicas[chosen].generate(prompt_ids, params, prefix), self.dies_after if dies else None
        )
        self.streams.append(stream)
        return stream

    async def score(self, token_ids: list[int], top: int) -> Mapping[str, Any]:
        replica = next(iter(self.replicas.values()))
        return await replica.score(token_ids, top)

    async def settle(self) -> None:
        """Let cancellations finish."""
        for stream in self.streams:
            for task in stream._closing:
                with contextlib.suppress(Exception):
                    await task
