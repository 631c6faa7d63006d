"""The Serve application: engine replicas (prefix-affine router, autoscaling) behind one ingress that runs the API."""

from __future__ import annotations

import functools

import attrs
from ray import serve
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.deployment import Application

from adapters.ray.deployments import EngineDeployment
from adapters.ray.router import PrefixAffinityRouter
from entrypoints.ray.engine import build_engine_replica
from entrypoints.ray.ingress import Ingress
from entrypoints.settings import ServerSettings

APP_NAME = "hf-openai-server"
ENGINE = "Engine"
INGRESS = "Ingress"
ROUTING_STATS_PERIOD = 2.0
"""Seconds between the replicas' load reports to the router (``/metrics`` per replica)."""
HEALTH_CHECK_PERIOD = 2.0
"""Seconds between Ray's health checks of a replica: how soon a dead one is noticed and replaced."""


@attrs.frozen(kw_only=True)
class ScaleSettings:
    """How many engine replicas, on what, and how the router weighs affinity against load."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    """With both set, Serve autoscales between them on requests in flight."""
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    imbalance: int = 4
    by_prefix: bool = True
    """Route by prompt prefix; ``False``: least loaded only, ties at random."""
    """How many more requests than the least loaded replica the prefix's replica may hold and still get it."""


def engine_threads(settings: ServerSettings, scale: ScaleSettings) -> ServerSettings:
    """Settings for a replica: without ``--threads``, torch gets the replica's CPUs (not the whole machine's)."""
    if settings.threads is not None or scale.replica_gpus:
        return settings
    return attrs.evolve(settings, threads=max(1, int(scale.replica_cpus)))


def build_application(settings: ServerSettings, scale: ScaleSettings) -> Application:
    """The engine deployment (one model per replica) bound into the ingress deployment."""
    replica_settings = engine_threads(settings, scale)
    autoscaling = None
    if scale.min_replicas is not None and scale.max_replicas is not None:
        autoscaling = AutoscalingConfig(
            min_replicas=scale.min_replicas,
            max_replicas=scale.max_replicas,
            target_ongoing_requests=max(1, settings.max_batch_size // 2),
        )
    router = RequestRouterConfig(
        request_router_class=PrefixAffinityRouter,  # type: ignore[arg-type]  # pydantic, mistyped
        request_router_kwargs={"deployment": ENGINE, "imbalance": scale.imbalance, "by_prefix": scale.by_prefix},
        request_routing_stats_period_s=ROUTING_STATS_PERIOD,  # type: ignore[arg-type]
    )
    engine = serve.deployment(
        name=ENGINE,
        num_replicas="auto" if autoscaling else scale.replicas,
        autoscaling_config=autoscaling,
        ray_actor_options={"num_cpus": scale.replica_cpus, "num_gpus": scale.replica_gpus},
        max_ongoing_requests=settings.max_batch_size + max(settings.max_queue, 1),
        health_check_period_s=HEALTH_CHECK_PERIOD,
        graceful_shutdown_timeout_s=settings.shutdown_timeout,
        request_router_config=router,
    )(EngineDeployment)
    ingress = serve.deployment(
        name=INGRESS,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=10_000,
        graceful_shutdown_timeout_s=settings.shutdown_timeout + 5,
    )(Ingress)
    engine_app = engine.bind(functools.partial(build_engine_replica, replica_settings))
    return ingress.bind(engine_app, settings, ENGINE)
