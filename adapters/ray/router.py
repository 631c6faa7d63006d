"""Ray Serve's ``RequestRouter`` for the engine replicas: prefix affinity first, least loaded when it is too busy."""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from adapters.ray.board import ReplicaBoard, board_for
from adapters.ray.ray_compat import queue_lengths

PREFIX_ARGUMENT = "prefix"
"""The keyword argument of ``generate`` that carries the prompt's block keys (``prefix_routing.prefix_keys``)."""


class PrefixAffinityRouter(RequestRouter):
    """Sends a generation to the replica that took its longest prefix before, unless that one is too busy.

    Too busy: ``imbalance`` requests more than the least loaded replica, which then gets it; other calls (facts,
    scoring) go to the least loaded replica.

    Its table lives on the process's ``ReplicaBoard`` for the deployment, where the ingress app reads the replicas'
    routing stats (``/metrics``) and whether any replica runs (``/health``).
    """

    _board: ReplicaBoard
    _by_prefix: bool

    def initialize_state(self, **kwargs: Any) -> None:  # noqa: ANN401  Ray passes request_router_kwargs through
        """``deployment`` names the board; ``imbalance`` sets how much busier the prefix's replica may be.

        ``by_prefix=False`` ignores prefixes: least loaded, ties broken at random (the baseline it is measured against).
        """
        self._board = board_for(str(kwargs.get("deployment", "engine")))
        self._board.affinity.imbalance = int(kwargs.get("imbalance", self._board.affinity.imbalance))
        self._by_prefix = bool(kwargs.get("by_prefix", True))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Ray's new view of the running replicas, with their routing stats: the board follows it."""
        super().update_replicas(replicas)
        self._board.update({replica.replica_id.unique_id: dict(replica.routing_stats) for replica in replicas})

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """The chosen replica first, then the rest (Ray takes the first that has room)."""
        lengths = await queue_lengths(self, candidate_replicas)
        if not lengths:
            return [candidate_replicas]
        by_id = {replica.replica_id.unique_id: replica for replica in lengths}
        keys = _prefix_of(pending_request) if self._by_prefix else ()
        chosen = by_id[self._board.affinity.choose(keys, {name: lengths[r] for name, r in by_id.items()})]
        others = sorted((r for r in candidate_replicas if r is not chosen), key=lambda r: lengths.get(r, 0))
        return [[chosen], others]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        """The replica took the request: it holds the request's prefix blocks now."""
        del result
        keys = _prefix_of(pending_request)
        if keys:
            self._board.affinity.record(keys, replica_id.unique_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """A dead replica leaves the board (``/metrics``, ``/health``, prefixes) at once, before Ray's next view."""
        super().on_replica_actor_died(replica_id)
        self._board.remove(replica_id.unique_id)


def _prefix_of(pending_request: PendingRequest | None) -> tuple[int, ...]:
    if pending_request is None:
        return ()
    return tuple(pending_request.kwargs.get(PREFIX_ARGUMENT, ()))
