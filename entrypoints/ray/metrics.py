"""Prometheus gauges of the whole deployment at the ingress: each replica's load and cache, and the router's hits."""

from __future__ import annotations

from collections.abc import Iterator

import attrs
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from adapters.ray.board import ReplicaBoard
from entrypoints.http.metrics import PREFIX

REPLICA_GAUGES = {
    "running": "Generation requests producing tokens on the replica.",
    "waiting": "Generation requests accepted by the replica that have produced nothing yet.",
    "prefix_cache_bytes": "Memory the replica's prefix cache holds.",
}


@attrs.frozen(eq=False)
class ReplicaCollector(Collector):
    """Reads the board at each scrape: ``hf_openai_replica_*{replica=...}``, replicas up, prefix routing outcomes."""

    board: ReplicaBoard

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """The gauges as the router last saw the replicas."""
        replicas = self.board.replicas()
        yield GaugeMetricFamily(f"{PREFIX}_replicas_running", "Engine replicas the router can send to.", len(replicas))
        for stat, documentation in REPLICA_GAUGES.items():
            family = GaugeMetricFamily(f"{PREFIX}_replica_{stat}", documentation, labels=("replica",))
            for replica, stats in sorted(replicas.items()):
                family.add_metric((replica,), float(stats.get(stat, 0)))
            yield family
        routed = CounterMetricFamily(
            f"{PREFIX}_prefix_routing",
            "Requests routed to the replica holding their prefix (hit) or to the least loaded one (miss).",
            labels=("outcome",),
        )
        routed.add_metric(("hit",), self.board.affinity.hits)
        routed.add_metric(("miss",), self.board.affinity.misses)
        yield routed
