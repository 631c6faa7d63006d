"""The Litestar application factory: routes, dependency wiring, error mapping and model loading."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import structlog
from litestar import Litestar, Request, Response, get
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from domain.errors import ModelNotReadyError
from domain.ports import Generator
from entrypoints.bootstrap import Services, build_services, load_services
from entrypoints.http.anthropic import MessagesController
from entrypoints.http.controllers import ChatController, CompletionsController, ModelsController
from entrypoints.http.errors import handle_error
from entrypoints.http.lifecycle import Drain, watch_provider
from entrypoints.http.metrics import Metrics, MetricsMiddleware, metrics_route
from entrypoints.http.request_id import add_request_id
from entrypoints.http.responses import ResponsesController, ResponseStore
from entrypoints.http.security import api_key_middleware, cors_config
from entrypoints.http.tokenization import TokenizationController
from entrypoints.settings import ServerSettings

log = structlog.get_logger(__name__)


@attrs.define
class ModelSlot:
    """Where the services appear once the model has loaded (or why they never will).

    With services at hand (tests) it serves at once; otherwise its lifespan loads them with ``loader``, off the event
    loop, so that the server answers (503) while the model loads.
    """

    settings: ServerSettings
    loader: Callable[[ServerSettings], Services]
    on_failure: Callable[[BaseException], None] | None = None
    on_loaded: Callable[[float], None] = lambda _seconds: None
    services: Services | None = None
    failure: str | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        """Load the model while the server runs (unless it is loaded), and close the services at the end."""
        task = None if self.services is not None else asyncio.create_task(self._load())
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            if self.services is not None:
                self.services.close()
            self.services = None

    def provide(self) -> Services:
        """The services, or a 503 ``model_not_ready`` while the model loads (or after it failed to)."""
        if self.services is None:
            raise ModelNotReadyError(self.failure or "the model is still loading; retry shortly")
        return self.services

    async def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.services = await asyncio.to_thread(self.loader, self.settings)
        except Exception as error:
            self.failure = f"the model failed to load: {error}"
            log.exception("model.load.failed")
            if self.on_failure is not None:
                self.on_failure(error)
            return
        seconds = time.perf_counter() - started
        self.on_loaded(seconds)
        log.info("model.ready", model=self.services.model_id, seconds=round(seconds, 2))


def health_route(slot: ModelSlot, ready: Callable[[], bool] = lambda: True) -> Any:  # noqa: ANN401  a route handler
    """``GET /health``: 200 ``ok`` once the model serves (and ``ready()``), 503 ``loading`` (or ``error``) before."""

    @get("/health", tags=["Health"], operation_id="health", summary="Readiness")
    async def health() -> Response[dict[str, str]]:
        """200 ``ok`` once the model serves, 503 ``loading`` (or ``error``) before."""
        if slot.services is not None and ready():
            return Response({"status": "ok", "model": slot.services.model_id}, status_code=HTTP_200_OK)
        status = "error" if slot.failure else "loading"
        return Response({"status": status}, status_code=HTTP_503_SERVICE_UNAVAILABLE)

    return health


def start_request_context(_request: Request[Any, Any, Any]) -> None:
    """Each request's logs carry only its own context."""
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
    metrics: Metrics | None = None,
    ready: Callable[[], bool] = lambda: True,
) -> Litestar:
    """Build the server. With ``generator`` (tests) it serves at once; otherwise ``loader`` runs in the lifespan.

    The server listens while the model loads: ``/health`` answers 503 ``loading`` and the API a 503 error until then.
    ``drain`` is shared with the server that drains on a signal (``DrainingServer``). ``metrics`` may carry collectors
    of the caller's (Ray's per-replica gauges); ``ready`` tells whether the engine serves now (a replica is up).
    """
    metrics = metrics or Metrics.create(draft_tokens=lambda: slot.services.draft_tokens() if slot.services else (0, 0))
    slot = ModelSlot(settings, loader, on_load_failure, on_loaded=metrics.model_load_seconds.set)
    if generator is not None:
        slot.services = build_services(settings, generator)
    drain = drain or Drain(grace=settings.shutdown_timeout)
    responses = ResponseStore(settings.responses_store_size)
    return Litestar(
        route_handlers=[
            health_route(slot, ready),
            openapi_document,
            metrics_route(metrics),
            ModelsController,
            ChatController,
            CompletionsController,
            TokenizationController,
            ResponsesController,
            MessagesController,
        ],
        dependencies={
            "services": Provide(slot.provide, sync_to_thread=False),
            "watch": Provide(watch_provider(settings, metrics, drain), sync_to_thread=False),
            "responses": Provide(lambda: responses, sync_to_thread=False),
        },
        exception_handlers={Exception: handle_error},
        middleware=[MetricsMiddleware(metrics), *api_key_middleware(settings)],
        cors_config=cors_config(settings),
        request_max_body_size=settings.max_body_bytes,
        before_request=start_request_context,
        before_send=[add_request_id],
        lifespan=[slot.lifespan],
        openapi_config=OpenAPIConfig(title="hf-openai-server", version="0.1.0", path="/docs"),
        logging_config=None,
        debug=False,
    )
