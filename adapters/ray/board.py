"""The ingress process's view of the engine replicas: their last reported load, and the router's hit count.

Ray builds the request router itself, inside a ``DeploymentHandle``, from a class path: nothing can be handed to
it. So the router and the ingress app meet here, in one board per deployment name for the whole process.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import attrs

from adapters.ray.prefix_routing import PrefixAffinity


@attrs.define
class ReplicaBoard:
    """The replicas of one deployment as the router last saw them, and its prefix affinity table."""

    affinity: PrefixAffinity[str] = attrs.field(factory=PrefixAffinity)
    _stats: dict[str, Mapping[str, float]] = attrs.field(init=False, factory=dict)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)

    def update(self, stats: Mapping[str, Mapping[str, float]]) -> None:
        """The running replicas now (replica id → its stats); those not named are gone."""
        with self._lock:
            gone = set(self._stats) - set(stats)
            self._stats = dict(stats)
        for replica in gone:
            self.affinity.forget(replica)

    def replicas(self) -> dict[str, Mapping[str, float]]:
        """Each running replica's last reported stats."""
        with self._lock:
            return dict(self._stats)

    def ready(self) -> bool:
        """At least one replica runs."""
        with self._lock:
            return bool(self._stats)


_BOARDS: dict[str, ReplicaBoard] = {}
_BOARDS_LOCK = threading.Lock()


def board_for(deployment: str) -> ReplicaBoard:
    """The process's board for ``deployment`` (made on first use)."""
    with _BOARDS_LOCK:
        return _BOARDS.setdefault(deployment, ReplicaBoard())
