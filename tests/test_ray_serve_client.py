"""The replica client over a Serve handle: each call is a request of its own to Ray's router (needs the [ray] extra).

Ray's router files the calls waiting for a replica by the internal id of the Serve request making them; two calls
of one request (the choices of ``n: 2``) under one id leave one of them waiting forever. No Ray cluster here: a
hand-written handle records the request context each call is made in.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import attrs
import pytest

pytest.importorskip("ray.serve", reason="the [ray] extra is not installed")

from ray.serve import context as serve_context

from adapters.ray.serve_client import ServeReplicaClient
from domain.generation import GenerationParams


def serve_request_ids() -> tuple[str, str]:
    """(request id, internal request id) of the Serve request the caller runs in."""
    current = serve_context._get_serve_request_context()
    return current.request_id, current._internal_request_id


@attrs.define
class Response:
    """A handle call's response: it answers at once, or never (``finishes=False``) until cancelled."""

    finishes: bool = True
    cancelled: bool = False

    def __await__(self):
        while not self.finishes:
            yield from asyncio.sleep(0.01).__await__()
        return {"logprobs": []}

    def cancel(self) -> None:
        self.cancelled = True


@attrs.define
class RecordingHandle:
    """Stands in for a ``DeploymentHandle``: each ``.remote()`` records the Serve request it was made in."""

    calls: list[tuple[str, tuple[str, str]]] = attrs.field(factory=list)
    responses: list[Response] = attrs.field(factory=list)
    finishes: bool = True
    method: str = ""

    def options(self, **_: Any) -> RecordingHandle:
        return self

    def __getattr__(self, name: str) -> RecordingHandle:
        return attrs.evolve(self, method=name)

    def remote(self, *args: Any, **kwargs: Any) -> Response:
        self.calls.append((self.method, serve_request_ids()))
        self.responses.append(Response(self.finishes))
        return self.responses[-1]


def test_each_call_of_one_request_goes_to_the_router_as_a_request_of_its_own() -> None:
    handle = RecordingHandle()
    client = ServeReplicaClient(handle)  # type: ignore[arg-type]

    async def one_request_with_two_choices() -> tuple[str, str]:
        serve_context._set_request_context(request_id="chatcmpl-1", _internal_request_id="proxy-id")
        for _ in range(3):
            client.generate([1, 2], GenerationParams(), ())
        await client.score([1, 2], 0)
        return serve_request_ids()

    after = asyncio.run(one_request_with_two_choices())
    assert [method for method, _ in handle.calls].count("generate") == 3
    internal_ids = [internal for _, (_, internal) in handle.calls]
    assert len(set(internal_ids)) == len(internal_ids) == 4, internal_ids
    assert "proxy-id" not in internal_ids
    assert {request_id for _, (request_id, _) in handle.calls} == {"chatcmpl-1"}, "logs keep the client's request id"
    assert after == ("chatcmpl-1", "proxy-id"), "the caller's own request context is left as it was"


def test_a_score_whose_caller_is_cancelled_is_cancelled_on_the_replica() -> None:
    handle = RecordingHandle(finishes=False)
    client = ServeReplicaClient(handle)  # type: ignore[arg-type]

    async def leave_while_scoring() -> None:
        scoring = asyncio.create_task(client.score([1, 2], 0))
        await asyncio.sleep(0)  # the call is made, and its answer awaited
        assert handle.responses
        scoring.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await scoring

    asyncio.run(leave_while_scoring())
    assert handle.responses[0].cancelled
