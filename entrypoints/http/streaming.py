"""Server-sent events in OpenAI's shape: chunks as they come, a final chunk, optional usage, then ``[DONE]``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from litestar.response import ServerSentEvent, ServerSentEventMessage

from domain.errors import DomainError
from domain.generation import CompletionStream, TextDelta, Usage
from entrypoints.http.errors import error_body
from entrypoints.http.wire import (
    ChatCompletionChunk,
    ChunkChoice,
    CompletionChoice,
    CompletionResponse,
    Delta,
    UsageBody,
    unstructure,
)

log = structlog.get_logger(__name__)

ChunkFactory = Callable[[str | None, str | None, UsageBody | None], object]
"""Builds one chunk from (text, finish_reason, usage)."""


class EventStream(ServerSentEvent):
    """``text/event-stream`` even from a handler whose other answers are JSON (Litestar prefers the handler's type)."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401  Litestar's signature
        """The ASGI response, with the event-stream media type kept."""
        kwargs["media_type"] = "text/event-stream"
        return super().to_asgi_response(*args, **kwargs)


def usage_body(usage: Usage) -> UsageBody:
    """The wire form of ``usage``."""
    return UsageBody(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)


def event(payload: object) -> ServerSentEventMessage:
    """One event: ``data:`` and the JSON, then a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(unstructure(payload), ensure_ascii=False)
    return ServerSentEventMessage(data=data, sep="\n")


def chat_chunks(response_id: str, created: int, model: str) -> ChunkFactory:
    """Chunk factory for ``chat.completion.chunk``; the first chunk carries the assistant role."""
    first = True

    def chunk(text: str | None, finish_reason: str | None, usage: UsageBody | None) -> object:
        nonlocal first
        if usage is not None:
            return ChatCompletionChunk(response_id, created, model, [], usage)
        delta = Delta(role="assistant" if first else None, content=text if text is not None or first else None)
        first = False
        return ChatCompletionChunk(response_id, created, model, [ChunkChoice(0, delta, finish_reason)])

    return chunk


def completion_chunks(response_id: str, created: int, model: str) -> ChunkFactory:
    """Chunk factory for streamed ``text_completion`` objects."""

    def chunk(text: str | None, finish_reason: str | None, usage: UsageBody | None) -> object:
        choices = [] if usage is not None else [CompletionChoice(0, text or "", finish_reason)]
        return CompletionResponse(response_id, created, model, choices, usage)

    return chunk


async def sse_stream(
    events: CompletionStream, chunk: ChunkFactory, *, include_usage: bool, role_first: bool
) -> AsyncIterator[ServerSentEventMessage]:
    """Translate a use case's stream into OpenAI's events; an error mid-stream becomes one error event."""
    try:
        if role_first:
            yield event(chunk("", None, None))
        async for item in events:
            if isinstance(item, TextDelta):
                if item.text:
                    yield event(chunk(item.text, None, None))
                continue
            yield event(chunk(None, str(item.finish_reason), None))
            if include_usage:
                yield event(chunk(None, None, usage_body(item.usage)))
    except Exception as error:
        status, body = error_body(error)
        if isinstance(error, DomainError) and status < 500:  # noqa: PLR2004
            log.info("stream.rejected", error=body.error.message)
        else:
            log.exception("stream.failed")
        yield event(body)
    finally:
        await events.aclose()
    yield event("[DONE]")
