"""Chat messages, the input of a chat completion."""

from __future__ import annotations

import enum

import attrs

from domain.tools import ToolCall


class Role(enum.StrEnum):
    """Who speaks in a conversation, as OpenAI names them."""

    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@attrs.frozen
class ChatMessage:
    """One turn of a conversation; ``content`` is plain text (parts are joined by the wire layer).

    An assistant turn may carry the ``tool_calls`` it made and the ``reasoning`` that led to it; a tool turn answers
    the call ``tool_call_id`` names.
    """

    role: Role
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    reasoning: str = ""
