"""``/v1/messages``: Anthropic's Messages API as a dialect of the chat use case.

https://docs.anthropic.com/en/api/messages
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import structlog
from litestar import Controller, Request, post
from litestar.response import ServerSentEventMessage

from domain.generation import Completion, CompletionEvent, CompletionStream, TextDelta
from entrypoints.bootstrap import Services
from entrypoints.http.anthropic_wire import (
    AnthropicUsage,
    CountTokensRequest,
    MessageBody,
    MessagesRequest,
    TokenCount,
    anthropic_error,
    anthropic_usage,
    stop_reason,
    tool_input,
)
from entrypoints.http.controllers import event_stream, read_json, read_request, until_disconnected
from entrypoints.http.lifecycle import RequestWatch
from entrypoints.http.openapi import NAMED_EVENTS, body_operation
from entrypoints.http.streaming import StreamEvent, named_event, stream_error
from entrypoints.http.wire import structure, unstructure

log = structlog.get_logger(__name__)


@attrs.define
class MessageWriter:
    """Turns the chat use case's events into the message's content blocks and Anthropic's stream events.

    Both the whole and the streamed answer are written by it, so their blocks are the same.
    """

    message: MessageBody
    requested_stops: tuple[str, ...]
    blocks: list[dict[str, Any]] = attrs.Factory(list)
    _open: str | None = None

    def start(self) -> list[StreamEvent]:
        """``message_start`` (the message, still empty) and a ``ping``."""
        return [{"type": "message_start", "message": unstructure(self.message)}, {"type": "ping"}]

    def feed(self, item: CompletionEvent) -> list[StreamEvent]:
        """The events of one step of the use case's stream."""
        events: list[StreamEvent] = []
        if isinstance(item, TextDelta):
            if item.reasoning:
                events += self._write("thinking", item.reasoning)
            if item.text:
                events += self._write("text", item.text)
            for call in item.tool_calls:
                events += self._close()
                index = len(self.blocks)
                block = {"type": "tool_use", "id": call.id, "name": call.name, "input": tool_input(call)}
                self.blocks.append(block)
                events += [
                    {"type": "content_block_start", "index": index, "content_block": block | {"input": {}}},
                    {
                        "type": "content_block_delta",
                        "index": index,
                        "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])},
                    },
                    {"type": "content_block_stop", "index": index},
                ]
        elif isinstance(item, Completion):
            events += self._close()
            self.message = self.finished(item)
            usage = unstructure(self.message.usage)
            events += [
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self.message.stop_reason, "stop_sequence": self.message.stop_sequence},
                    "usage": usage,
                },
                {"type": "message_stop"},
            ]
        return events

    def finished(self, completion: Completion) -> MessageBody:
        """The final message."""
        reason, sequence = stop_reason(completion.choices[0], self.requested_stops)
        return attrs.evolve(
            self.message,
            content=list(self.blocks),
            stop_reason=reason,
            stop_sequence=sequence,
            usage=anthropic_usage(completion.usage),
        )

    def _write(self, kind: str, text: str) -> list[StreamEvent]:
        """Text for the open block of ``kind`` (``text`` or ``thinking``), opening it first when needed."""
        events: list[StreamEvent] = []
        if self._open != kind:
            events += self._close()
            self._open = kind
            block = (
                {"type": "text", "text": ""}
                if kind == "text"
                else {"type": "thinking", "thinking": "", "signature": ""}
            )
            self.blocks.append(block)
            events.append({"type": "content_block_start", "index": len(self.blocks) - 1, "content_block": dict(block)})
        index = len(self.blocks) - 1
        self.blocks[index][kind] += text
        delta = {"type": "text_delta", "text": text} if kind == "text" else {"type": "thinking_delta", "thinking": text}
        events.append({"type": "content_block_delta", "index": index, "delta": delta})
        return events

    def _close(self) -> list[StreamEvent]:
        if self._open is None:
            return []
        self._open = None
        index = len(self.blocks) - 1
        events: list[StreamEvent] = []
        if self.blocks[index]["type"] == "thinking":
            events.append(
                {"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": ""}}
            )
        return [*events, {"type": "content_block_stop", "index": index}]


async def message_events(events: CompletionStream, writer: MessageWriter) -> AsyncIterator[ServerSentEventMessage]:
    """The stream of a message; an error after it started ends it with an ``error`` event."""
    try:
        for event in writer.start():
            yield named_event(event)
        async for item in events:
            for event in writer.feed(item):
                yield named_event(event)
    except Exception as error:  # noqa: BLE001  every failure ends the stream with an error event
        status, body = stream_error(error)
        yield named_event(anthropic_error(status, body.error.message))
    finally:
        await events.aclose()


async def written(events: CompletionStream, writer: MessageWriter) -> MessageBody:
    """Feed the whole stream to ``writer``; the final message."""
    async with contextlib.aclosing(events):
        async for item in events:
            writer.feed(item)
    return writer.message


class MessagesController(Controller):
    """``/v1/messages``: https://docs.anthropic.com/en/api/messages."""

    path = "/v1/messages"
    tags = ["Anthropic Messages"]  # noqa: RUF012  Litestar reads it from the class

    @post(
        operation_id="createMessage",
        summary="Create a message (Anthropic)",
        status_code=200,
        operation_class=body_operation(MessagesRequest, streams=True, events=NAMED_EVENTS),
    )
    async def create(self, request: Request[Any, Any, Any], services: Services, watch: RequestWatch) -> MessageBody:
        """Answer a conversation, whole or streamed as Anthropic's events."""
        message_id = f"msg_{uuid.uuid4().hex}"
        body, fields = await read_request(
            request, MessagesRequest, message_id, content=frozenset({"messages", "system"})
        )
        events = watch(services.chat.stream(body.conversation(), body.params(fields)))
        shell = MessageBody(message_id, services.model_id, [], None, None, AnthropicUsage(0, 0))
        writer = MessageWriter(shell, tuple(body.stop_sequences or ()))
        if body.stream:
            return await event_stream(  # type: ignore[return-value]
                request, events, lambda first: message_events(first, writer), watch.keepalive
            )
        return await until_disconnected(request, written(events, writer))

    @post(
        "/count_tokens",
        operation_id="countMessageTokens",
        summary="Count a message's input tokens (Anthropic)",
        status_code=200,
        operation_class=body_operation(CountTokensRequest),
    )
    async def count_tokens(self, request: Request[Any, Any, Any], services: Services) -> TokenCount:
        """The prompt tokens a conversation (with its system prompt and tools) takes, without generating."""
        body, _ = structure(await read_json(request), CountTokensRequest)
        structlog.contextvars.bind_contextvars(request_id=f"msg_{uuid.uuid4().hex}")
        prompt = services.chat.prompt(body.conversation())
        return TokenCount(len(prompt.token_ids))
