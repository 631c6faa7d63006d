"""The one home of Ray Serve's internals this project leans on, each named so a canary test can watch it.

``RequestRouter`` is an alpha API: a router that weighs replicas by load reads the queue lengths Ray keeps
(``_replica_queue_len_cache``) and asks replicas for them when unknown (``_probe_queue_lens``), as Ray Serve LLM's own
``PrefixCacheAffinityRouter`` does. A handle call made inside a Serve request inherits that request's internal id
from Serve's request context (``_serve_request_context``, ``_internal_request_id``), which ``own_request`` replaces.
Tested with ray 2.60; ``tests/test_compat.py`` fails clearly when these move.
"""

from __future__ import annotations

import contextvars
import dataclasses
import uuid
from collections.abc import Callable, Sequence
from typing import TypeVar

from ray.serve import context as serve_context
from ray.serve.request_router import RequestRouter, RunningReplica

T = TypeVar("T")

QUEUE_LEN_CACHE = "_replica_queue_len_cache"
USE_QUEUE_LEN_CACHE = "_use_replica_queue_len_cache"
PROBE_QUEUE_LENS = "_probe_queue_lens"
HOOKS = (QUEUE_LEN_CACHE, USE_QUEUE_LEN_CACHE, PROBE_QUEUE_LENS)
"""The private attributes of ``RequestRouter`` used here."""
REQUEST_CONTEXT = "_serve_request_context"
"""The context variable of ``ray.serve.context`` holding the current Serve request."""
INTERNAL_REQUEST_ID = "_internal_request_id"
"""The field of that request by which Ray's router files the handle calls waiting for a replica."""


async def queue_lengths(router: RequestRouter, candidates: Sequence[RunningReplica]) -> dict[RunningReplica, int]:
    """Requests each candidate holds: Ray's cached count, else a probe (a replica that does not answer is left out)."""
    lengths: dict[RunningReplica, int] = {}
    unknown: list[RunningReplica] = []
    cache = getattr(router, QUEUE_LEN_CACHE)
    for replica in candidates:
        length = cache.get(replica.replica_id) if getattr(router, USE_QUEUE_LEN_CACHE) else None
        if length is None:
            unknown.append(replica)
        else:
            lengths[replica] = int(length)
    if unknown:
        for replica, length in await getattr(router, PROBE_QUEUE_LENS)(unknown, 0):
            if length is not None:
                lengths[replica] = int(length)
    return lengths


def own_request(call: Callable[[], T]) -> T:
    """Run ``call`` (one handle call) as a request of its own to Ray's router: under a fresh internal request id.

    Ray's router files the calls waiting for a replica by the internal id of the Serve request that makes them, and
    takes a second waiting call with the same id for a retry of the first: of two calls one request makes at once
    (the choices of ``n: 2``), the one assigned second is never given a replica and waits forever (ray 2.60,
    ``RequestRouter._add_pending_request_to_indices``). The caller's own context is left as it was; the request id
    in the logs stays the caller's. Serve no longer cancels such a call when the client's request is cancelled (it
    finds a request's calls by that id): the caller cancels its calls itself (``HandleGenerator`` does).
    """
    return contextvars.copy_context().run(_with_fresh_internal_id, call)


def _with_fresh_internal_id(call: Callable[[], T]) -> T:
    variable: contextvars.ContextVar[object] = getattr(serve_context, REQUEST_CONTEXT)
    current = variable.get() or serve_context._RequestContext()  # noqa: SLF001  the one home of Serve's internals
    variable.set(dataclasses.replace(current, **{INTERNAL_REQUEST_ID: uuid.uuid4().hex}))  # type: ignore[type-var]
    return call()
