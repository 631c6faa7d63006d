"""``x-request-id`` on every response: the client's own, else the completion's id, else a fresh one.

The openai SDK exposes the header as ``_request_id`` and LangChain reads it; vLLM and OpenAI send it on every answer.
"""

from __future__ import annotations

import uuid
from typing import Any

from litestar.datastructures import MutableScopeHeaders

HEADER = "x-request-id"
_STATE_KEY = "response_id"


def remember_response_id(scope: Any, response_id: str) -> None:  # noqa: ANN401  an ASGI scope
    """Record the id of the response being built, which the header carries unless the client sent its own."""
    scope.setdefault("state", {})[_STATE_KEY] = response_id


async def add_request_id(message: Any, scope: Any) -> None:  # noqa: ANN401  Litestar's ``before_send`` hook
    """Put ``x-request-id`` on the start of every HTTP response.

    A coroutine function, though it awaits nothing: Litestar runs a plain function hook in its thread pool, and
    this one is called for every message sent (each streamed chunk), which then took a hop to a worker thread and
    back (with two hand-offs of the GIL and a wake-up of the event loop) to do nothing.
    """
    if message.get("type") != "http.response.start":
        return
    headers = MutableScopeHeaders.from_message(message)
    if headers.get(HEADER) is not None:
        return
    sent = _client_request_id(scope)
    state = scope.get("state") or {}
    headers[HEADER] = sent or state.get(_STATE_KEY) or uuid.uuid4().hex


def _client_request_id(scope: Any) -> str | None:  # noqa: ANN401  an ASGI scope
    for name, value in scope.get("headers") or ():
        if name.lower() == HEADER.encode():
            text: str = value.decode("latin-1").strip()
            return text[:256] or None
    return None
