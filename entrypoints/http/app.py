"""The Litestar application factory: routes, dependency wiring, error mapping and model loading."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import structlog
from litestar import Litestar, Request, Response, get
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from domain.ports import Generator
from entrypoints.bootstrap import Services, build_services, load_services, model_name, read_adapter
from entrypoints.http.anthropic import MessagesController
from entrypoints.http.controllers import ChatController, CompletionsController
from entrypoints.http.errors import handle_error
from entrypoints.http.lifecycle import Drain, watch_provider
from entrypoints.http.litestar_compat import request_body
from entrypoints.http.metrics import Metrics, MetricsMiddleware, metrics_route
from entrypoints.http.models import LoraController, ModelsController
from entrypoints.http.request_id import add_request_id
from entrypoints.http.responses import ResponsesController, ResponseStore
from entrypoints.http.security import api_key_middleware, cors_config
from entrypoints.http.tokenization import TokenizationController
from entrypoints.registry import ModelRegistry, RegistryLife
from entrypoints.settings import ModelChoice, ServerSettings

log = structlog.get_logger(__name__)


def health_route(registry: ModelRegistry, ready: Callable[[], bool] = lambda: True) -> Any:  # noqa: ANN401  a handler
    """``GET /health``: 200 ``ok`` once the preloaded models serve (and ``ready()``), 503 ``loading`` (or ``error``)."""

    @get("/health", tags=["Health"], operation_id="health", summary="Readiness")
    async def health() -> Response[dict[str, Any]]:
        """200 ``ok`` once the preloaded models serve (others load on demand), 503 ``loading`` or ``error`` before."""
        pinned = [entry for entry in registry.entries if entry.pinned]
        if ready() and all(entry.services is not None for entry in pinned):
            models = {entry.name: entry.status for entry in registry.entries}
            body = {"status": "ok", "model": registry.entries[0].name, "models": models}
            return Response(body, status_code=HTTP_200_OK)
        status = "error" if any(entry.failure for entry in pinned) else "loading"
        return Response({"status": status}, status_code=HTTP_503_SERVICE_UNAVAILABLE)

    return health


def services_provider(
    registry: ModelRegistry, metrics: Metrics
) -> Callable[[Request[Any, Any, Any]], AsyncIterator[Services]]:
    """A Litestar dependency: the services of the model the request names, held in use while the handler runs.

    The name is the body's ``model`` (none, or a body that is not JSON: the first model; the handler reports
    the body's own faults). A generation goes on counting as use after the handler returns, until its stream ends.
    """

    async def provide_services(request: Request[Any, Any, Any]) -> AsyncIterator[Services]:
        name = None
        if request.method == "POST":
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                body = json.loads(await request_body(request))
                name = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
        async with registry.serving(name) as services:
            metrics.model_requests.labels(services.model_id).inc()
            yield services

    return provide_services


async def start_request_context(_request: Request[Any, Any, Any]) -> None:
    """Each request's logs carry only its own context (cleared in the request's own task, not a worker thread's)."""
    structlog.contextvars.clear_contextvars()


@get("/openapi.json", include_in_schema=False, sync_to_thread=False)
def openapi_document(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The OpenAPI document, also where FastAPI-based servers (vLLM, TGI) publish it."""
    return request.app.openapi_schema.to_schema()


def create_app(
    settings: ServerSettings,
    *,
    generator: Generator | None = None,
    loader: Callable[[ServerSettings], Services] = load_services,
    on_load_failure: Callable[[BaseException], None] | None = None,
    drain: Drain | None = None,
    namer: Callable[[str | None], str] = model_name,
    metrics: Metrics | None = None,
    ready: Callable[[], bool] = lambda: True,
) -> Litestar:
    """Build the server. With ``generator`` (tests) it serves at once; otherwise ``loader`` loads each model.

    The server listens while the preloaded models load: ``/health`` answers 503 ``loading`` and their API a 503
    error until then. Other models load on their first request. ``drain`` is shared with the server that drains
    on a signal (``DrainingServer``). ``namer`` gives a model without ``NAME=`` its name. ``metrics`` may carry
    collectors of the caller's (Ray's per-replica gauges); ``ready`` tells whether the engine serves now (a replica
    is up).
    """

    def draft_tokens() -> tuple[int, int]:
        """Speculative draft tokens (proposed, accepted) of every loaded model's engine."""
        counts = [entry.services.draft_tokens() for entry in registry.entries if entry.services is not None]
        return sum(proposed for proposed, _ in counts), sum(accepted for _, accepted in counts)

    metrics = metrics or Metrics.create(draft_tokens=draft_tokens)
    if generator is not None:
        name = settings.served_model_names[0] if settings.served_model_names else generator.model_id
        preloaded = build_services(settings, generator)
        settings = attrs.evolve(settings, models=(ModelChoice(name=name, source=settings.model),))
        loader = lambda _settings: preloaded  # noqa: E731  the one model, already built
    registry = ModelRegistry(
        settings,
        loader,
        read_adapter,
        namer,
        on_failure=on_load_failure,
        on_loaded=metrics.loaded,
        on_unloaded=lambda name: metrics.model_loaded.labels(name).set(0),
    )
    if generator is not None:
        registry.entries[0].services = preloaded
        metrics.model_loaded.labels(registry.entries[0].name).set(1)
    drain = drain or Drain(grace=settings.shutdown_timeout)
    responses = ResponseStore(settings.responses_store_size)
    return Litestar(
        route_handlers=[
            health_route(registry, ready),
            openapi_document,
            metrics_route(metrics),
            ModelsController,
            LoraController,
            ChatController,
            CompletionsController,
            TokenizationController,
            ResponsesController,
            MessagesController,
        ],
        dependencies={
            "services": Provide(services_provider(registry, metrics)),
            "registry": Provide(lambda: registry, sync_to_thread=False),
            "watch": Provide(watch_provider(settings, metrics, drain), sync_to_thread=False),
            "responses": Provide(lambda: responses, sync_to_thread=False),
        },
        exception_handlers={Exception: handle_error},
        middleware=[MetricsMiddleware(metrics), *api_key_middleware(settings)],
        cors_config=cors_config(settings),
        request_max_body_size=settings.max_body_bytes,
        before_request=start_request_context,
        before_send=[add_request_id],
        lifespan=[RegistryLife(registry).lifespan],
        openapi_config=OpenAPIConfig(title="hf-openai-server", version="0.1.0", path="/docs"),
        logging_config=None,
        debug=False,
    )
