"""The ingress process's view of the engine replicas: their last reported load, and the router's hit count.

Ray builds the request router itself, inside a ``DeploymentHandle``, from a class path: nothing can be handed to
it. So the router and the ingress app meet here, in one board per deployment name for the whole process.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import attrs

from adapters.ray.prefix_routing import PrefixAffinity

COUNTERS = ("draft_tokens", "accepted_tokens")
"""Stats a replica counts up since it started (speculative decoding's draft tokens, proposed and accepted)."""


@attrs.define
class ReplicaBoard:
    """The replicas of one deployment as the router last saw them, and its prefix affinity table.

    Counters (``COUNTERS``) are summed over the replicas; a replica that goes keeps its last counts in the sum, so the
    deployment's counters never go down.
    """

    affinity: PrefixAffinity[str] = attrs.field(factory=PrefixAffinity)
    _stats: dict[str, Mapping[str, float]] = attrs.field(init=False, factory=dict)
    _gone: dict[str, dict[str, float]] = attrs.field(init=False, factory=dict)
    """The highest counts of each replica that went (by id: a replica reported gone twice counts once)."""
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    def update(self, stats: Mapping[str, Mapping[str, float]]) -> None:
        """The running replicas now (replica id → its stats); those not named are gone."""
        with self._lock:
            gone = set(self._stats) - set(stats)
            for replica in gone:
                self._retire(replica, self._stats[replica])
            self._stats = dict(stats)
        for replica in gone:
            self.affinity.forget(replica)

    def remove(self, replica: str) -> None:
        """``replica`` died (Ray found out before its next view of the replicas): nothing is sent to it any more."""
        with self._lock:
            stats = self._stats.pop(replica, None)
            if stats is not None:
                self._retire(replica, stats)
        self.affinity.forget(replica)

    def _retire(self, replica: str, stats: Mapping[str, float]) -> None:
        """Keep the counts of a replica that went (the highest seen: a late, stale view may report older ones)."""
        kept = self._gone.setdefault(replica, {})
        for counter in COUNTERS:
            kept[counter] = max(kept.get(counter, 0), stats.get(counter, 0))

    def replicas(self) -> dict[str, Mapping[str, float]]:
        """Each running replica's last reported stats."""
        with self._lock:
            return dict(self._stats)

    def ready(self) -> bool:
        """At least one replica runs."""
        with self._lock:
            return bool(self._stats)

    def total(self, counter: str) -> float:
        """``counter`` summed over every replica the deployment ran, running or gone (``COUNTERS`` only)."""
        with self._lock:
            replicas = self._stats.keys() | self._gone.keys()
            return sum(
                max(self._stats.get(replica, {}).get(counter, 0), self._gone.get(replica, {}).get(counter, 0))
                for replica in replicas
            )

    def draft_tokens(self) -> tuple[int, int]:
        """Speculative draft tokens (proposed, accepted) of the whole deployment, for ``/metrics``."""
        proposed, accepted = (int(self.total(counter)) for counter in COUNTERS)
        return proposed, accepted


_BOARDS: dict[str, ReplicaBoard] = {}
_BOARDS_LOCK = threading.Lock()


def board_for(deployment: str) -> ReplicaBoard:
    """The process's board for ``deployment`` (made on first use)."""
    with _BOARDS_LOCK:
        return _BOARDS.setdefault(deployment, ReplicaBoard())
