"""Thin Litestar controllers: parse the body, call one use case, shape OpenAI's response."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import structlog
from litestar import Controller, Request, post
from litestar.background_tasks import BackgroundTask
from litestar.response import ServerSentEventMessage

from application.generation import complete
from domain.errors import InvalidRequestError
from domain.generation import CompletionEvent, CompletionStream
from domain.options import OPTION_NAMES
from entrypoints.bootstrap import Services
from entrypoints.http.lifecycle import RequestWatch
from entrypoints.http.litestar_compat import request_body
from entrypoints.http.openai_answers import (
    AnswerShape,
    chat_chunks,
    chat_completion,
    completion_chunks,
    text_completion,
)
from entrypoints.http.openai_bodies import ChatCompletionResponse, CompletionResponse
from entrypoints.http.openai_requests import ChatCompletionRequest, CompletionRequest
from entrypoints.http.openapi import body_operation
from entrypoints.http.refusals import ClientDisconnectedError
from entrypoints.http.request_id import remember_response_id
from entrypoints.http.streaming import EventStream, keepalive, sse_stream
from entrypoints.http.wire import structure

log = structlog.get_logger(__name__)

T = TypeVar("T")


async def read_json(request: Request[Any, Any, Any]) -> Any:  # noqa: ANN401  any JSON value
    """The decoded JSON body; anything else is the client's error."""
    try:
        return json.loads(await request_body(request))
    except (ValueError, UnicodeDecodeError) as error:
        msg = f"the request body is not valid JSON: {error}"
        raise InvalidRequestError(msg) from error


async def read_body(request: Request[Any, Any, Any], kind: type[T]) -> T:
    """The body structured as ``kind`` (unknown fields ignored)."""
    parsed, _ = structure(await read_json(request), kind)
    return parsed


async def read_request(
    request: Request[Any, Any, Any],
    kind: type[T],
    response_id: str,
    *,
    content: frozenset[str] = frozenset({"messages", "prompt"}),
) -> tuple[T, dict[str, Any]]:
    """Decode and structure the body, start the request's log context (``response_id``), and log its parameters.

    Every dialect's create handler starts here; ``content`` names its fields logged elsewhere (message by message).
    """
    body = await read_json(request)
    parsed, unknown = structure(body, kind)
    structlog.contextvars.bind_contextvars(request_id=response_id)
    remember_response_id(request.scope, response_id)
    parameters = {k: v for k, v in body.items() if k not in content}
    log.info("request.received", path=request.url.path, parameters=parameters)
    if unread := sorted(name for name in unknown if name not in OPTION_NAMES):
        log.info("request.unknown_fields", fields=unread)
    return parsed, unknown


async def until_disconnected(request: Request[Any, Any, Any], work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (the body has been read already)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            log.info("request.cancelled", reason="client disconnected")
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # the generation releases what it holds before the handler returns
    if task.cancelled():
        raise ClientDisconnectedError
    return task.result()


async def event_stream(
    request: Request[Any, Any, Any],
    events: CompletionStream,
    messages: Callable[[CompletionStream], AsyncIterator[ServerSentEventMessage]],
    keepalive_seconds: float | None,
) -> EventStream:
    """The server-sent events ``messages`` makes of ``events``, answered once the first event has come.

    What fails before any output (a full queue, a generator error) is then a plain HTTP error with its status, not
    an error event in a 200 stream. A prefill that takes longer than ``keepalive_seconds`` starts the stream anyway,
    so it can send keep-alive comments while the first event is on its way.

    The response closes ``events`` when it is over, also when the client left before its body began: the body's
    generators never started then, so their own ``finally`` never ran, and the generation would go on for nobody.
    """
    first = asyncio.ensure_future(anext(events))
    try:
        await until_disconnected(request, asyncio.wait({first}, timeout=keepalive_seconds))
    except BaseException:
        first.cancel()
        await asyncio.wait({first})
        await events.aclose()
        raise
    if first.done() and first.exception() is not None:
        await events.aclose()
        first.result()  # raises what failed before any output
    body = keepalive(messages(_after(first, events)), keepalive_seconds)

    async def close() -> None:
        await body.aclose()
        first.cancel()
        await asyncio.wait({first})
        if not first.cancelled():
            first.exception()  # retrieved: a failure nobody was left to read is not logged as unhandled
        await events.aclose()

    return EventStream(body, background=BackgroundTask(close))


async def _after(first: asyncio.Future[CompletionEvent], events: CompletionStream) -> CompletionStream:
    try:
        yield await first
    finally:
        if not first.done():
            first.cancel()
            await asyncio.wait({first})
    async with contextlib.aclosing(events):
        async for event in events:
            yield event


class ChatController(Controller):
    """``/v1/chat/completions``: https://platform.openai.com/docs/api-reference/chat."""

    path = "/v1/chat/completions"
    tags = ["Chat"]  # noqa: RUF012  Litestar reads it from the class

    @post(
        operation_id="createChatCompletion",
        summary="Create a chat completion",
        status_code=200,
        operation_class=body_operation(ChatCompletionRequest, streams=True),
    )
    async def create(
        self, request: Request[Any, Any, Any], services: Services, watch: RequestWatch
    ) -> ChatCompletionResponse:
        """Answer a conversation, whole or streamed as server-sent events."""
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        body, unknown = await read_request(request, ChatCompletionRequest, response_id)
        shape = AnswerShape.of(body, response_id, services.model_id)
        events = watch(services.chat.stream(body.conversation(), body.to_params(unknown), n=body.n))
        if body.stream:
            chunks = chat_chunks(shape)
            return await event_stream(  # type: ignore[return-value]
                request,
                events,
                lambda first: sse_stream(first, chunks, include_usage=body.include_usage, announce=range(body.n)),
                watch.keepalive,
            )
        return chat_completion(await until_disconnected(request, complete(events)), shape)


class CompletionsController(Controller):
    """``/v1/completions``: https://platform.openai.com/docs/api-reference/completions."""

    path = "/v1/completions"
    tags = ["Completions"]  # noqa: RUF012  Litestar reads it from the class

    @post(
        operation_id="createCompletion",
        summary="Create a text completion",
        status_code=200,
        operation_class=body_operation(CompletionRequest, streams=True),
    )
    async def create(
        self, request: Request[Any, Any, Any], services: Services, watch: RequestWatch
    ) -> CompletionResponse:
        """Continue a prompt, whole or streamed as server-sent events."""
        response_id = f"cmpl-{uuid.uuid4().hex}"
        body, unknown = await read_request(request, CompletionRequest, response_id)
        shape = AnswerShape.of(body, response_id, services.model_id)
        events = watch(services.completion.stream(body.prompts(), body.to_params(unknown), n=body.n, echo=body.echo))
        if body.stream:
            chunks = completion_chunks(shape)
            return await event_stream(  # type: ignore[return-value]
                request,
                events,
                lambda first: sse_stream(first, chunks, include_usage=body.include_usage),
                watch.keepalive,
            )
        return text_completion(await until_disconnected(request, complete(events)), shape)
