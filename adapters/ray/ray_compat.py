"""The one home of Ray Serve's internals this project leans on, each named so a canary test can watch it.

``RequestRouter`` is an alpha API: a router that weighs replicas by load reads the queue lengths Ray keeps
(``_replica_queue_len_cache``) and asks replicas for them when unknown (``_probe_queue_lens``), as Ray Serve LLM's own
``PrefixCacheAffinityRouter`` does. Tested with ray 2.60; ``tests/test_compat.py`` fails clearly when these move.
"""

from __future__ import annotations

from collections.abc import Sequence

from ray.serve.request_router import RequestRouter, RunningReplica

QUEUE_LEN_CACHE = "_replica_queue_len_cache"
USE_QUEUE_LEN_CACHE = "_use_replica_queue_len_cache"
PROBE_QUEUE_LENS = "_probe_queue_lens"
HOOKS = (QUEUE_LEN_CACHE, USE_QUEUE_LEN_CACHE, PROBE_QUEUE_LENS)
"""The private attributes of ``RequestRouter`` used here."""


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
