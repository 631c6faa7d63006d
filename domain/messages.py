"""Chat messages, the input of a chat completion."""

from __future__ import annotations

import enum
from collections.abc import Mapping

import attrs

from domain.tools import NO_TOOLS, ToolCall, ToolUse


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


@attrs.frozen(kw_only=True)
class Conversation:
    """What a chat prompt is rendered from, in every dialect: the messages, the tools offered, the template's options.

    ``add_generation_prompt`` opens the assistant's turn; ``continue_final_message`` instead ends the prompt inside
    the last message, for the model to continue it. ``template_options`` reach the chat template as variables
    (``enable_thinking``, ``reasoning_effort``...).
    """

    messages: tuple[ChatMessage, ...]
    tools: ToolUse = NO_TOOLS
    template_options: Mapping[str, object] = attrs.field(factory=dict)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
