"""A request's time limits: its own ``--request-timeout`` and the server's graceful shutdown after a signal.

Both end a generation the same way: the use case's stream is closed (which stops the model within a step) and
the client gets an OpenAI error, as one event when streaming or as the response body otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import structlog
import uvicorn
from litestar import Request

from domain.generation import CompletionEvent, CompletionStream
from entrypoints.http.metrics import Metrics
from entrypoints.http.refusals import RequestTimeoutError, ServerShuttingDownError
from entrypoints.settings import ServerSettings

log = structlog.get_logger(__name__)

SHUTTING_DOWN = "the server is shutting down; retry the request"


@attrs.define
class Drain:
    """The server's shutdown: ``begin`` refuses new work at once, ``grace`` seconds later in-flight work ends."""

    grace: float = 30.0
    draining: bool = False
    expired: asyncio.Event = attrs.field(factory=asyncio.Event)
    _timer: asyncio.TimerHandle | None = attrs.field(default=None, init=False)

    def begin(self) -> None:
        """Start draining (call it on the event loop); a second call changes nothing."""
        if self.draining:
            return
        self.draining = True
        log.info("server.draining", grace_seconds=self.grace)
        self._timer = asyncio.get_running_loop().call_later(self.grace, self.expired.set)


async def bounded(events: CompletionStream, *, deadline: float | None, drain: Drain) -> CompletionStream:
    """``events`` until ``deadline`` (``time.monotonic``) passes or the drain's grace runs out, then an error.

    Each step of ``events`` runs as a task raced against both limits; a step that loses is cancelled, which
    closes the use case's stream and with it the model's.
    """
    expired = asyncio.ensure_future(drain.expired.wait())
    step: asyncio.Future[CompletionEvent] | None = None
    try:
        while True:
            step = asyncio.ensure_future(events.__anext__())
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, _ = await asyncio.wait({step, expired}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                if expired in done:
                    log.info("request.cancelled", reason="server shutting down")
                    raise ServerShuttingDownError(SHUTTING_DOWN)
                log.info("request.cancelled", reason="request timeout")
                raise RequestTimeoutError("the request took longer than the server's request timeout")
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        expired.cancel()
        if step is not None and not step.done():
            step.cancel()
            await asyncio.wait({step})
        await events.aclose()


@attrs.frozen
class RequestWatch:
    """What oversees one generation request: its metrics, its deadline and the server's drain."""

    endpoint: str
    started: float
    """Arrival, on the ``time.monotonic`` clock."""
    timeout: float | None
    metrics: Metrics
    drain: Drain
    keepalive: float | None = None
    """Seconds a stream may stay silent before it sends an SSE comment (``None``: never)."""

    def __call__(self, events: CompletionStream) -> CompletionStream:
        """``events`` measured and bounded; refused at once while the server drains."""
        if self.drain.draining:
            raise ServerShuttingDownError(SHUTTING_DOWN)
        deadline = None if self.timeout is None else self.started + self.timeout
        limited = bounded(events, deadline=deadline, drain=self.drain)
        return self.metrics.observe(limited, endpoint=self.endpoint, started=self.started)


def watch_provider(
    settings: ServerSettings, metrics: Metrics, drain: Drain
) -> Callable[[Request[Any, Any, Any]], RequestWatch]:
    """A Litestar dependency provider: a ``RequestWatch`` started when the request arrives."""

    def provide_watch(request: Request[Any, Any, Any]) -> RequestWatch:
        endpoint = request.scope.get("path_template") or request.url.path
        return RequestWatch(
            endpoint, time.monotonic(), settings.request_timeout, metrics, drain, settings.sse_keepalive
        )

    return provide_watch


class DrainingServer(uvicorn.Server):
    """uvicorn that drains on SIGTERM/SIGINT: stop listening, give requests ``drain.grace`` seconds, exit 0.

    uvicorn alone would cancel the remaining requests without a word to their clients, and re-raise the
    signal after shutting down (so the process would die of it); here requests end with an OpenAI error
    and the process exits normally.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    async def shutdown(self, sockets: Any = None) -> None:  # noqa: ANN401  uvicorn's signature
        """Start the drain, then let uvicorn close the listeners and wait for the connections."""
        self.drain.begin()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Route SIGINT/SIGTERM to ``handle_exit`` while serving; restore the old handlers without re-raising."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
