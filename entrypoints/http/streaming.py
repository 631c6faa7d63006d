"""Server-sent events in OpenAI's shape: chunks as they come, a final chunk, optional usage, then ``[DONE]``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import structlog
from litestar.response import ServerSentEvent, ServerSentEventMessage

from domain.errors import DomainError
from domain.generation import Choice, Completion, CompletionStream, TextDelta, Usage
from entrypoints.http.errors import error_body
from entrypoints.http.refusals import RefusalError
from entrypoints.http.wire import (
    ChatCompletionChunk,
    ChunkChoice,
    CompletionChoice,
    CompletionResponse,
    Delta,
    PromptTokensDetails,
    UsageBody,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    unstructure,
)
from entrypoints.http.wire_tools import function_call_body, tool_call_deltas

log = structlog.get_logger(__name__)

ChunkFactory = Callable[[TextDelta | Choice | Completion], object]
"""Builds the chunk that carries one event of a use case's stream."""


class EventStream(ServerSentEvent):
    """``text/event-stream`` even from a handler whose other answers are JSON (Litestar prefers the handler's type)."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ANN401  Litestar's signature
        """The ASGI response, with the event-stream media type kept."""
        kwargs["media_type"] = "text/event-stream"
        return super().to_asgi_response(*args, **kwargs)


def usage_body(usage: Usage) -> UsageBody:
    """The wire form of ``usage``."""
    return UsageBody(
        usage.prompt_tokens, usage.completion_tokens, usage.total_tokens, PromptTokensDetails(usage.cached_tokens)
    )


def event(payload: object) -> ServerSentEventMessage:
    """One event: ``data:`` and the JSON, then a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(unstructure(payload), ensure_ascii=False)
    return ServerSentEventMessage(data=data, sep="\n")


def chat_chunks(
    response_id: str, created: int, model: str, *, logprobs: bool, legacy_functions: bool = False
) -> ChunkFactory:
    """Chunk factory for ``chat.completion.chunk``; each choice's first chunk carries the assistant role.

    Tool calls are sent whole as they complete, numbered within their choice; to a legacy ``functions`` request,
    the call is ``delta.function_call``.
    """
    started: set[int] = set()
    called: dict[int, int] = {}

    def chunk(item: TextDelta | Choice | Completion) -> object:
        if isinstance(item, Completion):
            return ChatCompletionChunk(response_id, created, model, [], usage_body(item.usage))
        first = item.index not in started
        started.add(item.index)
        role = "assistant" if first else None
        if isinstance(item, Choice):
            reason = finish_reason(item, legacy_functions=legacy_functions)
            choice = ChunkChoice(item.index, Delta(role=role, content="" if first else None), reason)
        else:
            entries = chat_logprobs(item.logprobs) if logprobs else None
            calls = tool_call_deltas(item.tool_calls, called.get(item.index, 0)) if item.tool_calls else None
            called[item.index] = called.get(item.index, 0) + len(item.tool_calls)
            content = item.text if item.text or not calls else None
            delta = Delta(role=role, content=content, tool_calls=calls)
            if legacy_functions and item.tool_calls:
                delta = Delta(
                    role=role, content=item.text or None, function_call=function_call_body(item.tool_calls[0])
                )
            choice = ChunkChoice(item.index, delta, None, entries)
        return ChatCompletionChunk(response_id, created, model, [choice])

    return chunk


def completion_chunks(response_id: str, created: int, model: str, *, logprobs: bool) -> ChunkFactory:
    """Chunk factory for streamed ``text_completion`` objects."""

    def chunk(item: TextDelta | Choice | Completion) -> object:
        if isinstance(item, Completion):
            return CompletionResponse(response_id, created, model, [], usage_body(item.usage))
        if isinstance(item, Choice):
            choice = CompletionChoice(item.index, "", str(item.finish_reason))
        else:
            entries = completion_logprobs(item.logprobs) if logprobs else None
            choice = CompletionChoice(item.index, item.text, None, entries)
        return CompletionResponse(response_id, created, model, [choice])

    return chunk


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
            if isinstance(item, TextDelta) and not (item.text or item.logprobs or item.tool_calls):
                continue
            if isinstance(item, Completion) and not include_usage:
                continue
            yield event(chunk(item))
    except Exception as error:
        status, body = error_body(error)
        if isinstance(error, DomainError) and status < 500:  # noqa: PLR2004
            log.info("stream.rejected", error=body.error.message)
        elif isinstance(error, RefusalError):
            log.warning("stream.refused", status=status, code=body.error.code)
        else:
            log.exception("stream.failed")
        yield event(body)
    finally:
        await events.aclose()
    yield event("[DONE]")
