"""Server-sent events in OpenAI's shape: chunks as they come, a final chunk, optional usage, then ``[DONE]``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

import attrs
import structlog
from litestar.response import ServerSentEvent, ServerSentEventMessage

from domain.errors import DomainError
from domain.generation import Choice, Completion, CompletionStream, TextDelta, Usage
from entrypoints.http.errors import error_body
from entrypoints.http.openai_bodies import (
    ChatCompletionChunk,
    ChunkChoice,
    CompletionChoice,
    CompletionResponse,
    CompletionTokensDetails,
    Delta,
    ErrorBody,
    PromptTokensDetails,
    ScoredChatCompletionChunk,
    UsageBody,
    chat_logprobs,
    completion_choice,
    completion_logprobs,
    finish_reason,
    prompt_logprobs_body,
)
from entrypoints.http.refusals import RefusalError
from entrypoints.http.wire import unstructure
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
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        PromptTokensDetails(usage.cached_tokens),
        CompletionTokensDetails(usage.reasoning_tokens),
    )


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


def chat_chunks(
    response_id: str,
    created: int,
    model: str,
    *,
    logprobs: bool,
    legacy_functions: bool = False,
    token_ids: bool = False,
    continuous_usage: bool = False,
) -> ChunkFactory:
    """Chunk factory for ``chat.completion.chunk``; each choice's first chunk carries the assistant role.

    Tool calls are sent whole as they complete, numbered within their choice; to a legacy ``functions`` request,
    the call is ``delta.function_call``. With ``token_ids`` logprobs name tokens by id; with ``continuous_usage``
    every chunk carries its choice's usage so far.
    """
    started: set[int] = set()
    called: dict[int, int] = {}
    usage_so_far = _UsageSoFar(enabled=continuous_usage)

    def chunk(item: TextDelta | Choice | Completion) -> object:
        if isinstance(item, Completion):
            return ChatCompletionChunk(response_id, created, model, [], usage_body(item.usage))
        first = item.index not in started
        started.add(item.index)
        role = "assistant" if first else None
        if isinstance(item, Choice):
            reason = finish_reason(item, legacy_functions=legacy_functions)
            choice = ChunkChoice(item.index, Delta(role=role, content="" if first else None), reason)
            if item.prompt_logprobs is None:
                return ChatCompletionChunk(response_id, created, model, [choice], usage_so_far(item))
            scored = prompt_logprobs_body(item.prompt_logprobs)
            return ScoredChatCompletionChunk(
                response_id, created, model, [choice], usage_so_far(item), prompt_logprobs=scored
            )
        entries = chat_logprobs(item.logprobs, token_ids=token_ids) if logprobs else None
        calls = tool_call_deltas(item.tool_calls, called.get(item.index, 0)) if item.tool_calls else None
        called[item.index] = called.get(item.index, 0) + len(item.tool_calls)
        content = item.text if item.text or not (calls or item.reasoning) else None
        thought = item.reasoning or None
        delta = Delta(role=role, content=content, tool_calls=calls, reasoning_content=thought, reasoning=thought)
        if legacy_functions and item.tool_calls:
            call = function_call_body(item.tool_calls[0])
            delta = attrs.evolve(delta, content=item.text or None, tool_calls=None, function_call=call)
        choice = ChunkChoice(item.index, delta, None, entries)
        return ChatCompletionChunk(response_id, created, model, [choice], usage_so_far(item))

    return chunk


def completion_chunks(
    response_id: str,
    created: int,
    model: str,
    *,
    logprobs: bool,
    token_ids: bool = False,
    continuous_usage: bool = False,
) -> ChunkFactory:
    """Chunk factory for streamed ``text_completion`` objects (switches as for ``chat_chunks``)."""
    usage_so_far = _UsageSoFar(enabled=continuous_usage)

    def chunk(item: TextDelta | Choice | Completion) -> object:
        if isinstance(item, Completion):
            return CompletionResponse(response_id, created, model, [], usage_body(item.usage))
        if isinstance(item, Choice):
            choice = completion_choice(item.index, "", str(item.finish_reason), prompt_logprobs=item.prompt_logprobs)
        else:
            entries = completion_logprobs(item.logprobs, token_ids=token_ids) if logprobs else None
            choice = CompletionChoice(item.index, item.text, None, entries)
        return CompletionResponse(response_id, created, model, [choice], usage_so_far(item))

    return chunk


@attrs.define
class _UsageSoFar:
    """vLLM's continuous usage: a choice's prompt tokens and the tokens it has generated, on each of its chunks."""

    enabled: bool
    prompts: dict[int, int] = attrs.Factory(dict)

    def __call__(self, item: TextDelta | Choice) -> UsageBody | None:
        if not self.enabled:
            return None
        if isinstance(item, TextDelta) and item.prompt_tokens:
            self.prompts[item.index] = item.prompt_tokens
        prompt = self.prompts.get(item.index)
        if prompt is None:
            return None
        return UsageBody(prompt, item.completion_tokens, prompt + item.completion_tokens)


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
) -> AsyncIterator[ServerSentEventMessage]:
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
