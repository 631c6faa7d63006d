"""The ``ReplicaClient`` port over a Ray Serve ``DeploymentHandle`` to the engine deployment."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, cast

import attrs
from ray.exceptions import RayError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from adapters.ray.ray_compat import own_request
from adapters.ray.router import PREFIX_ARGUMENT
from adapters.ray.wire import ReplicaUnavailableError
from domain.errors import DomainError, GenerationError, QueueFullError
from domain.generation import GenerationParams


def translate(error: Exception) -> DomainError:
    """What a client is told when a call to a replica fails inside Ray (not in our code, which reports in-band)."""
    if isinstance(error, BackPressureError):
        return QueueFullError("every engine replica is busy and the queue is full: retry shortly")
    if isinstance(error, RayTaskError):
        return GenerationError(f"the engine replica failed: {error.cause or error}")
    return ReplicaUnavailableError(f"the engine replica is unavailable: {type(error).__name__}")


@attrs.define
class ServeReplicaStream:
    """A replica's stream of steps; Ray's failures (a dead replica) come out as domain errors."""

    response: DeploymentResponseGenerator[Any]

    async def __aiter__(self) -> AsyncIterator[Sequence[Mapping[str, Any]]]:
        """The replica's batches of items."""
        try:
            async for item in self.response:
                yield item
        except (RayError, BackPressureError) as error:
            raise translate(error) from error

    def cancel(self) -> None:
        """Cancel the generation on its replica (Ray cancels the replica's task, which closes its stream)."""
        self.response.cancel()


@attrs.define
class ServeReplicaClient:
    """Generation and scoring on the engine deployment's replicas, routed by ``PrefixAffinityRouter``."""

    handle: DeploymentHandle[Any]

    def generate(self, prompt_ids: list[int], params: GenerationParams, prefix: tuple[int, ...]) -> ServeReplicaStream:
        """Start a generation on the replica the router picks for ``prefix``, as a request of its own to the router.

        One client request makes several calls at once (one per choice of ``n``); Ray's router would assign only one of
        them (``ray_compat.own_request``).
        """
        streaming = self.handle.options(stream=True)
        response = own_request(lambda: streaming.generate.remote(prompt_ids, params, **{PREFIX_ARGUMENT: prefix}))
        return ServeReplicaStream(cast("DeploymentResponseGenerator[Any]", response))

    async def score(self, token_ids: list[int], top: int) -> Mapping[str, Any]:
        """Score on the least loaded replica; cancelled with the caller (a client that left)."""
        response = own_request(lambda: self.handle.score.remote(token_ids, top))
        try:
            answer: Mapping[str, Any] = await response
        except (RayError, BackPressureError) as error:
            raise translate(error) from error
        except asyncio.CancelledError:
            response.cancel()
            raise
        return answer
