"""Chat messages, the input of a chat completion."""

from __future__ import annotations

import enum

import attrs


class Role(enum.StrEnum):
    """Who speaks in a conversation, as OpenAI names them."""

    SYSTEM = "system"
    DEVELOPER = "developer"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


@attrs.frozen
class ChatMessage:
    """One turn of a conversation; ``content`` is plain text (parts are joined by the wire layer)."""

    role: Role
    content: str
    name: str | None = None
