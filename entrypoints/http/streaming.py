"""Server-sent events in OpenAI's shape: chunks as they come, a final chunk, optional usage, then ``[DONE]``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import structlog
from litestar.response import ServerSentEvent, ServerSentEventMessage

from domain.errors import DomainError
from domain.generation import Choice, Completion, CompletionStream, TextDelta
from entrypoints.http.errors import error_body
from entrypoints.http.openai_bodies import (
    ErrorBody,
)
from entrypoints.http.refusals import RefusalError
from entrypoints.http.wire import unstructure

log = structlog.get_logger(__name__)


ChunkFactory = Callable[[TextDelta | Choice | Completion], object]
"""Builds the chunk that carries one event of a use case's stream."""


class EventStream(ServerSentEvent):
    """``text/event-stream`` even from a handler whose other answers are JSON (Litestar prefers the handler's type)."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401  Litestar's signature
        """The ASGI response, with the event-stream media type kept."""
        kwargs["media_type"] = "text/event-stream"
        return super().to_asgi_response(*args, **kwargs)


def event(payload: object) -> ServerSentEventMessage:
    """One event: ``data:`` and the JSON, then a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(unstructure(payload), ensure_ascii=False)
    return ServerSentEventMessage(data=data, sep="\n")


StreamEvent = dict[str, Any]
"""One event of a dialect with named events (Responses, Messages): its ``type`` names it."""


def named_event(payload: StreamEvent) -> ServerSentEventMessage:
    """One event of a stream whose events are named (Responses, Anthropic): ``event: {type}`` and its JSON."""
    return ServerSentEventMessage(data=json.dumps(payload, ensure_ascii=False), event=payload["type"], sep="\n")


def stream_error(error: Exception) -> tuple[int, ErrorBody]:
    """The status and error body of a failure after a stream started, logged as the request's end."""
    status, body = error_body(error)
    if isinstance(error, DomainError) and status < 500:  # noqa: PLR2004
        log.info("stream.rejected", error=body.error.message)
    elif isinstance(error, RefusalError):
        log.warning("stream.refused", status=status, code=body.error.code)
    else:
        log.error("stream.failed", exc_info=error)
    return status, body


async def sse_stream(
    events: CompletionStream, chunk: ChunkFactory, *, include_usage: bool, announce: range = range(0)
) -> AsyncIterator[ServerSentEventMessage]:
    """Translate a use case's stream into OpenAI's events; an error mid-stream becomes one error event.

    ``announce`` lists the choices whose first chunk is sent before any text (chat sends the role at once).
    """
    try:
        for index in announce:
            yield event(chunk(TextDelta("", index)))
        async for item in events:
            if isinstance(item, TextDelta) and not (item.text or item.logprobs or item.tool_calls or item.reasoning):
                continue
            if isinstance(item, Completion) and not include_usage:
                continue
            yield event(chunk(item))
    except Exception as error:  # noqa: BLE001  every failure ends the stream with an error event
        _, body = stream_error(error)
        yield event(body)
    finally:
        await events.aclose()
    yield event("[DONE]")


PING = ServerSentEventMessage(data=None, comment="ping", sep="\n")
"""An SSE comment: clients ignore it, proxies see the connection is alive."""


async def keepalive(
    messages: AsyncIterator[ServerSentEventMessage], interval: float | None
) -> AsyncGenerator[ServerSentEventMessage]:
    """``messages``, with a ``: ping`` comment whenever none has been sent for ``interval`` seconds.

    A long prefill on a CPU can outlast a proxy's idle timeout; the comment keeps the connection open.
    """
    pending: asyncio.Future[ServerSentEventMessage] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(messages))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield PING
                continue
            try:
                message = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield message
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            await asyncio.wait({pending})
        if isinstance(messages, AsyncGenerator):
            await messages.aclose()
