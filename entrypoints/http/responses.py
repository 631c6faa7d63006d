"""``/v1/responses``: OpenAI's Responses API as a dialect of the chat use case, with its bounded response store.

https://platform.openai.com/docs/api-reference/responses
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import attrs
import structlog
from litestar import Controller, Request, delete, get, post
from litestar.exceptions import NotFoundException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.response import ServerSentEventMessage

from domain.errors import InvalidRequestError
from domain.generation import Choice, Completion, CompletionEvent, CompletionStream, FinishReason, TextDelta
from domain.messages import ChatMessage, Conversation, Role
from entrypoints.bootstrap import Services
from entrypoints.http.controllers import event_stream, read_request, until_disconnected
from entrypoints.http.lifecycle import RequestWatch
from entrypoints.http.openai_bodies import ErrorBody
from entrypoints.http.openapi import NAMED_EVENTS, body_operation
from entrypoints.http.responses_wire import (
    DeletedResponse,
    FunctionCallItem,
    IncompleteDetails,
    InputItem,
    InputItemList,
    MessageItem,
    OutputItem,
    OutputText,
    ReasoningItem,
    ReasoningText,
    ResponseBody,
    ResponseError,
    ResponsesRequest,
    conversation,
    new_id,
    response_shell,
    response_usage,
)
from entrypoints.http.streaming import StreamEvent, named_event, stream_error
from entrypoints.http.wire import unstructure

log = structlog.get_logger(__name__)


@attrs.frozen
class StoredResponse:
    """A response kept for ``previous_response_id``: its body, its input items, and the whole conversation so far."""

    body: ResponseBody
    input_items: list[dict[str, Any]]
    history: tuple[ChatMessage, ...]
    """Every earlier turn and this response's input and output, without the instructions (they do not carry over)."""


@attrs.define
class ResponseStore:
    """Stored responses in memory, at most ``capacity``; the least recently used is evicted first."""

    capacity: int = 1000
    _responses: collections.OrderedDict[str, StoredResponse] = attrs.field(factory=collections.OrderedDict)

    def put(self, stored: StoredResponse) -> None:
        """Keep ``stored``, evicting the least recently used when full."""
        if self.capacity <= 0:
            return
        self._responses[stored.body.id] = stored
        self._responses.move_to_end(stored.body.id)
        while len(self._responses) > self.capacity:
            evicted, _ = self._responses.popitem(last=False)
            log.info("responses.evicted", response_id=evicted)

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored response, marked as recently used; ``None`` when unknown or evicted."""
        stored = self._responses.get(response_id)
        if stored is not None:
            self._responses.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        """Forget a response; whether it was there."""
        return self._responses.pop(response_id, None) is not None

    def __len__(self) -> int:
        return len(self._responses)


@attrs.define
class ResponseWriter:
    """Turns the chat use case's events into the response's output items and OpenAI's stream events.

    Both the whole and the streamed answer are written by it, so their items (and ids) are the same.
    """

    response: ResponseBody
    items: list[OutputItem] = attrs.Factory(list)
    completion: Completion | None = None
    """The use case's result, once the stream has ended."""
    _sequence: int = 0
    _open: ReasoningItem | MessageItem | None = None
    _text: str = ""

    def start(self) -> list[StreamEvent]:
        """``response.created`` and ``response.in_progress``."""
        return [
            self._event("response.created", response=unstructure(self.response)),
            self._event("response.in_progress", response=unstructure(self.response)),
        ]

    def feed(self, item: CompletionEvent) -> list[StreamEvent]:
        """The events of one step of the use case's stream."""
        events: list[StreamEvent] = []
        if isinstance(item, TextDelta):
            if item.reasoning:
                events += self._write(ReasoningItem, item.reasoning)
            if item.text:
                events += self._write(MessageItem, item.text)
            for call in item.tool_calls:
                events += self._close()
                called = FunctionCallItem(new_id("fc"), call.id, call.name, call.arguments)
                added = attrs.evolve(called, arguments="", status="in_progress")
                index = len(self.items)
                self.items.append(called)
                events += [
                    self._event("response.output_item.added", output_index=index, item=unstructure(added)),
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=called.id,
                        output_index=index,
                        delta=call.arguments,
                    ),
                    self._event(
                        "response.function_call_arguments.done",
                        item_id=called.id,
                        output_index=index,
                        name=call.name,
                        arguments=call.arguments,
                    ),
                    self._event("response.output_item.done", output_index=index, item=unstructure(called)),
                ]
        elif isinstance(item, Completion):
            events += self._close()
            self.completion = item
            self.response = self.finished(item)
            kind = "response.completed" if self.response.status == "completed" else "response.incomplete"
            events.append(self._event(kind, response=unstructure(self.response)))
        return events

    def finished(self, completion: Completion) -> ResponseBody:
        """The final response object."""
        incomplete = completion.finish_reason is FinishReason.LENGTH
        return attrs.evolve(
            self.response,
            status="incomplete" if incomplete else "completed",
            incomplete_details=IncompleteDetails("max_output_tokens") if incomplete else None,
            output=list(self.items),
            usage=response_usage(completion.usage),
        )

    def fail(self, code: str, message: str) -> list[StreamEvent]:
        """``response.failed``: the generation broke off (the items written so far stay)."""
        events = self._close()
        self.response = attrs.evolve(
            self.response, status="failed", output=list(self.items), error=ResponseError(code, message)
        )
        return [*events, self._event("response.failed", response=unstructure(self.response))]

    def _write(self, kind: type[ReasoningItem | MessageItem], text: str) -> list[StreamEvent]:
        """Text for the open item of ``kind``, opening one (and closing another) first when needed."""
        events: list[StreamEvent] = []
        thinking = kind is ReasoningItem
        if not isinstance(self._open, kind):
            events += self._close()
            opened = ReasoningItem(new_id("rs"), []) if thinking else MessageItem(new_id("msg"), [])
            self._open = opened
            index = len(self.items)
            self.items.append(opened)
            pending = unstructure(attrs.evolve(opened, status="in_progress"))
            part = {"type": "reasoning_text", "text": ""} if thinking else unstructure(OutputText(""))
            events += [
                self._event("response.output_item.added", output_index=index, item=pending),
                self._event(
                    "response.content_part.added", item_id=opened.id, output_index=index, content_index=0, part=part
                ),
            ]
        assert self._open is not None  # noqa: S101  opened just above
        self._text += text
        where = {"item_id": self._open.id, "output_index": len(self.items) - 1, "content_index": 0}
        if thinking:
            events.append(self._event("response.reasoning_text.delta", **where, delta=text))
        else:
            events.append(self._event("response.output_text.delta", **where, delta=text, logprobs=[]))
        return events

    def _close(self) -> list[StreamEvent]:
        """Finish the open reasoning or message item."""
        opened, text = self._open, self._text
        if opened is None:
            return []
        self._open, self._text = None, ""
        index = len(self.items) - 1
        where = {"item_id": opened.id, "output_index": index, "content_index": 0}
        done: ReasoningItem | MessageItem
        if isinstance(opened, ReasoningItem):
            done = attrs.evolve(opened, content=[ReasoningText(text)])
            part: dict[str, Any] = {"type": "reasoning_text", "text": text}
            text_done = self._event("response.reasoning_text.done", **where, text=text)
        else:
            done = attrs.evolve(opened, content=[OutputText(text)])
            part = unstructure(OutputText(text))
            text_done = self._event("response.output_text.done", **where, text=text, logprobs=[])
        self.items[index] = done
        return [
            text_done,
            self._event("response.content_part.done", **where, part=part),
            self._event("response.output_item.done", output_index=index, item=unstructure(done)),
        ]

    def _event(self, kind: str, **fields: Any) -> StreamEvent:  # noqa: ANN401  JSON values
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event


async def response_events(
    events: CompletionStream, writer: ResponseWriter, on_finished: Callable[[ResponseWriter], None]
) -> AsyncIterator[ServerSentEventMessage]:
    """The stream of a response; an error after it started ends it with ``response.failed``."""
    try:
        for event in writer.start():
            yield named_event(event)
        async for item in events:
            for event in writer.feed(item):
                yield named_event(event)
        on_finished(writer)
    except Exception as error:  # noqa: BLE001  every failure ends the stream with an error event
        _, body = stream_error(error)
        for event in writer.fail(body.error.code or body.error.type, body.error.message):
            yield named_event(event)
    finally:
        await events.aclose()


async def written(events: CompletionStream, writer: ResponseWriter) -> ResponseBody:
    """Feed the whole stream to ``writer``; the final response."""
    async with contextlib.aclosing(events):
        async for item in events:
            writer.feed(item)
    return writer.response


def stored_items(items: list[InputItem]) -> list[dict[str, Any]]:
    """Input items as ``input_items`` lists them: each with an id, message text as ``input_text`` parts."""
    listed = []
    for item in items:
        data = {key: value for key, value in unstructure(item).items() if value is not None}
        if item.type == "message":
            data["content"] = (
                [{"type": "input_text", "text": item.content}]
                if isinstance(item.content, str)
                else [
                    {key: value for key, value in part.items() if value is not None} for part in data.get("content", [])
                ]
            )
            data.setdefault("status", "completed")
        data.setdefault("id", new_id({"message": "msg", "function_call": "fc"}.get(item.type, item.type[:4])))
        listed.append(data)
    return listed


def answer_turn(choice: Choice) -> ChatMessage:
    """The assistant's turn a response adds to its conversation."""
    return ChatMessage(Role.ASSISTANT, choice.text, tool_calls=choice.tool_calls, reasoning=choice.reasoning)


class ResponsesController(Controller):
    """``/v1/responses``: https://platform.openai.com/docs/api-reference/responses."""

    path = "/v1/responses"
    tags = ["Responses"]  # noqa: RUF012  Litestar reads it from the class

    @post(
        operation_id="createResponse",
        summary="Create a response",
        status_code=200,
        operation_class=body_operation(ResponsesRequest, streams=True, events=NAMED_EVENTS),
    )
    async def create(
        self,
        request: Request[Any, Any, Any],
        services: Services,
        watch: RequestWatch,
        responses: ResponseStore,
    ) -> ResponseBody:
        """Answer the input (after the previous response's conversation), whole or streamed as events."""
        response_id = new_id("resp")
        body, unknown = await read_request(
            request, ResponsesRequest, response_id, content=frozenset({"input", "instructions"})
        )
        history: tuple[ChatMessage, ...] = ()
        if body.previous_response_id is not None:
            previous = responses.get(body.previous_response_id)
            if previous is None:
                msg = f"Previous response with id '{body.previous_response_id}' not found."
                raise InvalidRequestError(msg, param="previous_response_id")
            history = previous.history
        items = body.input_items()
        turns = (*history, *conversation(items))
        instructions = [ChatMessage(Role.SYSTEM, body.instructions)] if body.instructions else []
        asked = Conversation(
            messages=(*instructions, *turns), tools=body.tool_use(), template_options=body.template_options()
        )
        events = watch(services.chat.stream(asked, body.params(unknown)))
        writer = ResponseWriter(response_shell(body, response_id, int(time.time()), services.model_id))
        kept_items = stored_items(items)

        def keep(finished: ResponseWriter) -> None:
            if body.keeps and finished.completion is not None:
                answer = answer_turn(finished.completion.choices[0])
                responses.put(StoredResponse(finished.response, kept_items, (*turns, answer)))

        if body.stream:
            return await event_stream(  # type: ignore[return-value]
                request, events, lambda first: response_events(first, writer, keep), watch.keepalive
            )
        await until_disconnected(request, written(events, writer))
        keep(writer)
        return writer.response

    @get("/{response_id:str}", operation_id="getResponse", summary="Retrieve a stored response")
    async def retrieve(self, response_id: str, responses: ResponseStore) -> ResponseBody:
        """A response created with ``store`` (the default), while the store still holds it."""
        return _stored(responses, response_id).body

    @delete("/{response_id:str}", operation_id="deleteResponse", summary="Delete a stored response", status_code=200)
    async def remove(self, response_id: str, responses: ResponseStore) -> DeletedResponse:
        """Forget a stored response."""
        _stored(responses, response_id)
        responses.delete(response_id)
        return DeletedResponse(response_id)

    @get(
        "/{response_id:str}/input_items",
        operation_id="listInputItems",
        summary="List a response's input items",
        responses={400: ResponseSpec(ErrorBody, description="A query parameter is out of range")},
    )
    async def input_items(
        self,
        response_id: str,
        responses: ResponseStore,
        limit: int = Parameter(default=20, ge=1, le=100),
        order: Literal["asc", "desc"] = "desc",
        after: str | None = None,
    ) -> InputItemList:
        """The input items of a stored response, a page at a time (newest first unless ``order=asc``)."""
        items = list(_stored(responses, response_id).input_items)
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [item["id"] for item in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        return InputItemList(
            page, page[0]["id"] if page else None, page[-1]["id"] if page else None, len(items) > limit
        )


def _stored(responses: ResponseStore, response_id: str) -> StoredResponse:
    stored = responses.get(response_id)
    if stored is None:
        msg = f"Response with id '{response_id}' not found."
        raise NotFoundException(msg)
    return stored
