"""Anthropic's Messages API on the wire: the request, its content blocks, the message, stream events and errors.

Built to Anthropic's reference (https://docs.anthropic.com/en/api/messages) and the ``anthropic`` SDK's types. The
conversation maps to the shared model (``ChatMessage``, ``ToolUse``): the chat use case does the work.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

import attrs
from attrs import validators as v

from domain.errors import InvalidRequestError
from domain.generation import Choice, FinishReason, GenerationParams, OutputConstraint, Usage
from domain.messages import ChatMessage, Conversation, Role
from domain.options import read_options
from domain.tools import FunctionTool, ToolChoice, ToolChoiceMode, ToolUse
from domain.tools import ToolCall as DomainToolCall
from entrypoints.http.openai_requests import option_field
from entrypoints.http.wire_tools import FunctionDefinition, ToolDefinition, check_json_schema

ANTHROPIC_PATH = "/v1/messages"


def speaks_anthropic(path: str) -> bool:
    """Whether ``path`` is one of the Messages API's, whose errors take Anthropic's envelope."""
    return path == ANTHROPIC_PATH or path.startswith(f"{ANTHROPIC_PATH}/")


ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error body: ``{"type": "error", "error": {"type": ..., "message": ...}}``."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")  # noqa: PLR2004
    return {"type": "error", "error": {"type": kind, "message": message}}


# Request -----------------------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class ResultBlock:
    """A block of a ``tool_result``'s content; only text is understood."""

    type: str
    text: str | None = None


@attrs.frozen(kw_only=True)
class ContentBlock:
    """A block of a message's content: ``text``, ``tool_use``, ``tool_result``, ``thinking`` (flat, by ``type``)."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: str | list[ResultBlock] | None = None
    is_error: bool | None = None
    thinking: str | None = None
    signature: str | None = None
    data: str | None = None


@attrs.frozen(kw_only=True)
class InputMessage:
    """One of ``messages``: a user or assistant turn, its content a string or blocks."""

    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


@attrs.frozen(kw_only=True)
class SystemBlock:
    """A text block of ``system``."""

    type: str = "text"
    text: str


@attrs.frozen(kw_only=True)
class AnthropicTool:
    """One of ``tools``: a client tool with its ``input_schema``; server tools are not offered."""

    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


@attrs.frozen(kw_only=True)
class AnthropicToolChoice:
    """``tool_choice``: ``auto``, ``any`` (some tool), ``tool`` (the one named) or ``none``."""

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


@attrs.frozen(kw_only=True)
class ThinkingConfig:
    """``thinking``: turns a reasoning template's thinking on or off (``budget_tokens`` is not enforced)."""

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None


@attrs.frozen(kw_only=True)
class Metadata:
    """``metadata``: who the end user is."""

    user_id: str | None = None


@attrs.frozen(kw_only=True)
class OutputFormat:
    """``output_config.format``: the answer is JSON matching ``schema`` (Anthropic's structured outputs)."""

    type: Literal["json_schema"]
    schema: dict[str, Any]


@attrs.frozen(kw_only=True)
class OutputConfig:
    """``output_config``: the answer's format, and how hard to think (passed to templates as ``reasoning_effort``)."""

    effort: str | None = None
    format: OutputFormat | None = None


@attrs.frozen(kw_only=True)
class ConversationRequest:
    """What ``/v1/messages`` and ``/v1/messages/count_tokens`` share: the conversation, tools and thinking."""

    model: str | None = None
    messages: list[InputMessage] = attrs.field(validator=v.min_len(1))
    system: str | list[SystemBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def chat_messages(self) -> list[ChatMessage]:
        """The conversation as domain messages: the system prompt first, tool results as tool turns."""
        messages: list[ChatMessage] = []
        system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system or ())
        if system:
            messages.append(ChatMessage(Role.SYSTEM, system))
        for index, message in enumerate(self.messages):
            messages.extend(_turns(message, index))
        return messages

    def tool_use(self) -> ToolUse:
        """The offered tools, the tool choice and whether calls may be parallel."""
        tools = tuple(_tool(tool, index) for index, tool in enumerate(self.tools or ()))
        choice = self.tool_choice
        if choice is None:
            return ToolUse(tools, ToolChoice(ToolChoiceMode.AUTO if tools else ToolChoiceMode.NONE))
        modes = {"auto": ToolChoiceMode.AUTO, "any": ToolChoiceMode.REQUIRED, "none": ToolChoiceMode.NONE}
        if choice.type == "tool":
            if not choice.name:
                raise InvalidRequestError("tool_choice.name is required when its type is 'tool'", param="tool_choice")
            mapped = ToolChoice(ToolChoiceMode.REQUIRED, choice.name)
        else:
            mapped = ToolChoice(modes[choice.type])
        return ToolUse(tools, mapped, parallel=not choice.disable_parallel_tool_use)

    def conversation(self) -> Conversation:
        """What the chat prompt is rendered from: the system prompt and messages, tools, the template's options."""
        return Conversation(
            messages=tuple(self.chat_messages()), tools=self.tool_use(), template_options=self.template_options()
        )

    def template_options(self) -> dict[str, Any]:
        """Variables for the chat template: ``thinking`` as ``enable_thinking``, and ``chat_template_kwargs``."""
        options: dict[str, Any] = {}
        if self.thinking is not None and self.thinking.type != "adaptive":
            options["enable_thinking"] = self.thinking.type == "enabled"
        if self.output_config is not None and self.output_config.effort is not None:
            options["reasoning_effort"] = self.output_config.effort
        return options | (self.chat_template_kwargs or {})

    def constraint(self) -> OutputConstraint | None:
        """The output constraint ``output_config.format`` asks for, enforced as chat's ``response_format`` is."""
        wanted = None if self.output_config is None else self.output_config.format
        if wanted is None:
            return None
        check_json_schema(wanted.schema, "output_config.format.schema")
        return OutputConstraint(json_schema=wanted.schema, param="output_config.format")


@attrs.frozen(kw_only=True)
class MessagesRequest(ConversationRequest):
    """Body of ``POST /v1/messages``."""

    max_tokens: int = attrs.field(validator=v.ge(1), metadata={"schema": {"minimum": 1}})
    stop_sequences: list[str] | None = None
    stream: bool = False
    temperature: float | None = option_field("temperature", high=1)
    top_p: float | None = option_field("top_p")
    top_k: int | None = option_field("top_k")
    metadata: Metadata | None = None
    seed: int | None = option_field("seed")

    reads_options: ClassVar[bool] = True
    """Its other fields may carry the options of ``domain.options`` (HuggingFace's, as in OpenAI's dialect)."""

    def params(self, fields: dict[str, Any]) -> GenerationParams:
        """The generation parameters; ``fields`` are the request's other fields (HuggingFace's options...)."""
        options, extra = read_options(fields)
        return GenerationParams(
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=tuple(self.stop_sequences or ()),
            constraint=self.constraint(),
            options=options if self.top_k is None else options | {"top_k": self.top_k},
            extra=extra,
        )


@attrs.frozen(kw_only=True)
class CountTokensRequest(ConversationRequest):
    """Body of ``POST /v1/messages/count_tokens``."""


def _text_of(blocks: str | list[ResultBlock] | None, param: str) -> str:
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    texts = []
    for block in blocks:
        if block.type != "text" or block.text is None:
            msg = f"content blocks of type {block.type!r} are not supported; only 'text' blocks are"
            raise InvalidRequestError(msg, param=param)
        texts.append(block.text)
    return "".join(texts)


def _turns(message: InputMessage, index: int) -> list[ChatMessage]:
    """The domain turns of one message: a user turn's tool results become tool turns before its text."""
    role = Role(message.role)
    if isinstance(message.content, str):
        return [ChatMessage(role, message.content)]
    turns: list[ChatMessage] = []
    texts: list[str] = []
    calls: list[DomainToolCall] = []
    thinking: list[str] = []
    for number, block in enumerate(message.content):
        where = f"messages[{index}].content[{number}]"
        if block.type == "text":
            texts.append(block.text or "")
        elif block.type == "tool_use" and role is Role.ASSISTANT:
            calls.append(_call(block, where))
        elif block.type == "tool_result" and role is Role.USER:
            turns.append(_result(block, where))
        elif block.type in {"thinking", "redacted_thinking"} and role is Role.ASSISTANT:
            thinking.append(block.thinking or "")
        else:
            msg = f"{where}: content blocks of type {block.type!r} are not supported in a {role} message"
            raise InvalidRequestError(msg, param=where)
    if texts or calls or not turns:
        turns.append(ChatMessage(role, "".join(texts), tool_calls=tuple(calls), reasoning="".join(thinking)))
    return turns


def _call(block: ContentBlock, where: str) -> DomainToolCall:
    if not block.id or not block.name:
        msg = f"{where}: a tool_use block needs its id and name"
        raise InvalidRequestError(msg, param=where)
    return DomainToolCall(block.id, block.name, json.dumps(block.input or {}, ensure_ascii=False))


def _result(block: ContentBlock, where: str) -> ChatMessage:
    if not block.tool_use_id:
        msg = f"{where}: a tool_result block needs its tool_use_id"
        raise InvalidRequestError(msg, param=where)
    return ChatMessage(Role.TOOL, _text_of(block.content, where), tool_call_id=block.tool_use_id)


def _tool(tool: AnthropicTool, index: int) -> FunctionTool:
    if tool.type not in {None, "custom"}:
        msg = f"tools[{index}]: the server tool {tool.type!r} is not offered by this server; only client tools are"
        raise InvalidRequestError(msg, param=f"tools[{index}].type")
    parameters = tool.input_schema
    return ToolDefinition(
        function=FunctionDefinition(name=tool.name, description=tool.description, parameters=parameters)
    ).to_domain(index)


# Response ----------------------------------------------------------------------------------------------------------


@attrs.frozen
class AnthropicUsage:
    """``usage``: input tokens (those read from the prefix cache counted apart, as Anthropic counts them)."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


def anthropic_usage(usage: Usage) -> AnthropicUsage:
    """Anthropic's usage: ``input_tokens`` are those not read from the cache."""
    return AnthropicUsage(usage.prompt_tokens - usage.cached_tokens, usage.completion_tokens, 0, usage.cached_tokens)


@attrs.frozen
class MessageBody:
    """The answer: ``{"type": "message", "role": "assistant", "content": [blocks], "stop_reason": ...}``."""

    id: str
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None
    stop_sequence: str | None
    usage: AnthropicUsage
    type: str = "message"
    role: str = "assistant"


@attrs.frozen
class TokenCount:
    """Body of ``POST /v1/messages/count_tokens``."""

    input_tokens: int


def stop_reason(choice: Choice, requested: tuple[str, ...]) -> tuple[str, str | None]:
    """``stop_reason`` and ``stop_sequence`` of a finished choice."""
    if choice.finish_reason is FinishReason.TOOL_CALLS:
        return "tool_use", None
    if choice.finish_reason is FinishReason.LENGTH:
        return "max_tokens", None
    if choice.stop_sequence is not None and choice.stop_sequence in requested:
        return "stop_sequence", choice.stop_sequence
    return "end_turn", None


def tool_input(call: DomainToolCall) -> dict[str, Any]:
    """A call's arguments as the ``input`` object of a ``tool_use`` block."""
    value = call.arguments_value()
    return value if isinstance(value, dict) else {}
