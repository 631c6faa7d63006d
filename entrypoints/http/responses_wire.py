"""OpenAI's Responses API on the wire: the request, its input items, the response object and its stream events.

Built to OpenAI's reference (https://platform.openai.com/docs/api-reference/responses) and the ``openai`` SDK's
types. Everything maps to and from the shared conversation model (``ChatMessage``, ``ToolUse``, ``Choice``): the
chat use case does the work.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import attrs

from domain.errors import InvalidRequestError
from domain.generation import GenerationParams, OutputConstraint, Usage
from domain.messages import ChatMessage, Role
from domain.tools import FunctionTool, ToolCall, ToolChoice, ToolChoiceMode, ToolUse
from entrypoints.http.openai_requests import ReasoningEffort, SamplingRequest, ranged, template_options
from entrypoints.http.wire_tools import FunctionDefinition, ToolDefinition, check_json_schema

BUILT_IN_TOOLS = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "file_search",
        "computer_use_preview",
        "computer_use",
        "code_interpreter",
        "image_generation",
        "mcp",
        "local_shell",
        "shell",
        "apply_patch",
        "custom",
    }
)
"""OpenAI's hosted tools: this server runs none of them."""

TEXT_PARTS = frozenset({"input_text", "output_text", "text", "summary_text", "reasoning_text"})
"""Content parts that carry text; images, files and audio are not understood."""


def new_id(prefix: str) -> str:
    """An id in OpenAI's style: ``resp_...``, ``msg_...``, ``fc_...``, ``rs_...``."""
    return f"{prefix}_{uuid.uuid4().hex}"


# Request -----------------------------------------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class InputPart:
    """A part of an input message's content: ``input_text`` or ``output_text`` (or a reasoning item's text)."""

    type: str
    text: str | None = None


@attrs.frozen(kw_only=True)
class InputItem:
    """One item of ``input``: a message, a function call or its output, or a reasoning item.

    The items are those the Responses API returns (clients send them back); a message may leave ``type`` out.
    """

    type: str = "message"
    role: Literal["system", "developer", "user", "assistant"] | None = None
    content: str | list[InputPart] | None = None
    id: str | None = None
    status: str | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None
    summary: list[InputPart] | None = None


@attrs.frozen(kw_only=True)
class ResponsesTool:
    """One of ``tools``: a function, in the Responses API's flat shape (``name`` and ``parameters`` at the top)."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


@attrs.frozen(kw_only=True)
class FunctionChoice:
    """``tool_choice: {"type": "function", "name": ...}``: call exactly this function."""

    type: str
    name: str | None = None


@attrs.frozen(kw_only=True)
class TextFormat:
    """``text.format``: free text, any JSON object, or JSON matching a named schema (flat, unlike chat's)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None

    def constraint(self) -> OutputConstraint | None:
        """The output constraint, enforced as chat's ``response_format`` is."""
        if self.type == "text":
            return None
        if self.type == "json_schema" and self.schema is not None:
            check_json_schema(self.schema, "text.format.schema")
            return OutputConstraint(json_schema=self.schema, param="text.format")
        return OutputConstraint(param="text.format")


@attrs.frozen(kw_only=True)
class TextConfig:
    """``text``: the output's format (and verbosity, which a local model cannot honour and ignores)."""

    format: TextFormat = attrs.field(factory=TextFormat)
    verbosity: str | None = None


@attrs.frozen(kw_only=True)
class ReasoningConfig:
    """``reasoning``: how hard to think, passed to templates that read ``reasoning_effort``."""

    effort: ReasoningEffort | None = None
    summary: str | None = None
    generate_summary: str | None = None


@attrs.frozen(kw_only=True)
class ResponsesRequest(SamplingRequest):
    """Body of ``POST /v1/responses``; the sampling and HuggingFace options are those chat accepts."""

    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = ranged(1)
    store: bool | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    background: bool | None = None
    reasoning: ReasoningConfig | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    top_logprobs: int | None = ranged(0, 20)
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for name in ("conversation", "prompt"):
            if getattr(self, name) is not None:
                msg = f"'{name}' (stored {name}s) is not offered by this server; send the input itself"
                raise InvalidRequestError(msg, param=name)
        if self.background:
            msg = "background responses are not offered by this server; leave background unset or false"
            raise InvalidRequestError(msg, param="background")
        if self.n != 1:
            raise InvalidRequestError("the Responses API produces one output; n must be 1", param="n")
        if self.top_logprobs:
            raise InvalidRequestError("top_logprobs is not supported yet on /v1/responses", param="top_logprobs")

    @property
    def keeps(self) -> bool:
        """Whether the response is stored (``store`` defaults to true)."""
        return self.store is not False

    def params(self, extra: dict[str, Any]) -> GenerationParams:
        """The generation parameters: chat's, with ``max_output_tokens`` and ``text.format``."""
        params = self.to_params(extra)
        if self.max_output_tokens is not None:
            params = attrs.evolve(params, max_new_tokens=self.max_output_tokens)
        if self.text is not None:
            params = attrs.evolve(params, constraint=self.text.format.constraint())
        return params

    def template_options(self) -> dict[str, Any]:
        """Variables for the chat template: ``chat_template_kwargs`` and ``reasoning.effort``."""
        effort = None if self.reasoning is None else self.reasoning.effort
        return template_options(self.chat_template_kwargs, effort)

    def tool_use(self) -> ToolUse:
        """The offered function tools, the tool choice and whether calls may be parallel; hosted tools are refused."""
        tools = tuple(_function_tool(tool, index) for index, tool in enumerate(self.tools or ()))
        return ToolUse(
            tools, _tool_choice(self.tool_choice, has_tools=bool(tools)), self.parallel_tool_calls is not False
        )

    def input_items(self) -> list[InputItem]:
        """``input`` as items: a string is one user message."""
        if isinstance(self.input, str):
            return [InputItem(type="message", role="user", content=self.input)]
        return list(self.input)


def _function_tool(tool: ResponsesTool, index: int) -> FunctionTool:
    if tool.type != "function":
        kind = "built-in tool" if tool.type in BUILT_IN_TOOLS else "tool type"
        msg = f"tools[{index}]: the {kind} {tool.type!r} is not offered by this server; only function tools are"
        raise InvalidRequestError(msg, param=f"tools[{index}].type")
    if not tool.name:
        msg = f"tools[{index}].name is required"
        raise InvalidRequestError(msg, param=f"tools[{index}].name")
    definition = ToolDefinition(
        function=FunctionDefinition(
            name=tool.name, description=tool.description, parameters=tool.parameters, strict=tool.strict
        )
    )
    return definition.to_domain(index)


def _tool_choice(body: str | FunctionChoice | None, *, has_tools: bool) -> ToolChoice:
    if isinstance(body, FunctionChoice):
        if body.type != "function" or not body.name:
            msg = f"tool_choice of type {body.type!r} is not offered; use 'none', 'auto', 'required' or a function"
            raise InvalidRequestError(msg, param="tool_choice")
        return ToolChoice(ToolChoiceMode.REQUIRED, body.name)
    if body is None:
        return ToolChoice(ToolChoiceMode.AUTO if has_tools else ToolChoiceMode.NONE)
    return ToolChoice(ToolChoiceMode(body))


def _text(parts: str | list[InputPart] | None, param: str) -> str:
    if parts is None or isinstance(parts, str):
        return parts or ""
    texts = []
    for part in parts:
        if part.type not in TEXT_PARTS or part.text is None:
            msg = f"content part type {part.type!r} is not supported; only text parts are"
            raise InvalidRequestError(msg, param=param)
        texts.append(part.text)
    return "".join(texts)


def conversation(items: list[InputItem], *, start: int = 0) -> list[ChatMessage]:
    """The domain conversation of input items: function calls join the assistant's turn, outputs become tool turns.

    A reasoning item's text goes with the assistant turn that follows it. ``start`` numbers the items in errors.
    """
    messages: list[ChatMessage] = []
    thinking = ""
    for number, item in enumerate(items, start=start):
        where = f"input[{number}]"
        if item.type == "message":
            message = _message(item, where, thinking)
            messages.append(message)
            thinking = "" if message.role is Role.ASSISTANT else thinking
        elif item.type == "function_call":
            call = _function_call(item, where)
            last = messages[-1] if messages else None
            if last is not None and last.role is Role.ASSISTANT and (last.tool_calls or not thinking):
                messages[-1] = attrs.evolve(last, tool_calls=(*last.tool_calls, call))
            else:
                messages.append(ChatMessage(Role.ASSISTANT, "", tool_calls=(call,), reasoning=thinking))
                thinking = ""
        elif item.type == "function_call_output":
            if not item.call_id:
                msg = f"{where}: a function_call_output item needs the call_id of the call it answers"
                raise InvalidRequestError(msg, param=f"{where}.call_id")
            messages.append(ChatMessage(Role.TOOL, _text(item.output, f"{where}.output"), tool_call_id=item.call_id))
        elif item.type == "reasoning":
            thinking += _text(item.content, f"{where}.content") or _text(item.summary, f"{where}.summary")
        else:
            msg = f"{where}: input items of type {item.type!r} are not supported"
            raise InvalidRequestError(msg, param=f"{where}.type")
    return messages


def _message(item: InputItem, where: str, thinking: str) -> ChatMessage:
    if item.role is None:
        msg = f"{where}.role is required"
        raise InvalidRequestError(msg, param=f"{where}.role")
    role = Role(item.role)
    reasoning = thinking if role is Role.ASSISTANT else ""
    return ChatMessage(role, _text(item.content, f"{where}.content"), reasoning=reasoning)


def _function_call(item: InputItem, where: str) -> ToolCall:
    if not item.call_id or not item.name:
        msg = f"{where}: a function_call item needs its call_id and name"
        raise InvalidRequestError(msg, param=where)
    return ToolCall(item.call_id, item.name, item.arguments or "{}")


# Response ----------------------------------------------------------------------------------------------------------


@attrs.frozen
class OutputText:
    """``output_text`` content of a message item."""

    text: str
    type: Literal["output_text"] = "output_text"
    annotations: list[Any] = attrs.field(factory=list)
    logprobs: list[Any] = attrs.field(factory=list)


@attrs.frozen
class MessageItem:
    """An output ``message``: the assistant's answer text."""

    id: str
    content: list[OutputText]
    status: str = "completed"
    type: Literal["message"] = "message"
    role: str = "assistant"


@attrs.frozen
class FunctionCallItem:
    """An output ``function_call``: ``call_id`` is what the client sends back with the function's output."""

    id: str
    call_id: str
    name: str
    arguments: str
    status: str = "completed"
    type: Literal["function_call"] = "function_call"


@attrs.frozen
class ReasoningText:
    """A reasoning item's ``content`` part."""

    text: str
    type: Literal["reasoning_text"] = "reasoning_text"


@attrs.frozen
class ReasoningItem:
    """An output ``reasoning`` item: what the model thought before answering."""

    id: str
    content: list[ReasoningText]
    summary: list[Any] = attrs.field(factory=list)
    status: str = "completed"
    type: Literal["reasoning"] = "reasoning"
    encrypted_content: str | None = None


OutputItem = MessageItem | FunctionCallItem | ReasoningItem


@attrs.frozen
class InputTokensDetails:
    """``usage.input_tokens_details``."""

    cached_tokens: int = 0


@attrs.frozen
class OutputTokensDetails:
    """``usage.output_tokens_details``."""

    reasoning_tokens: int = 0


@attrs.frozen
class ResponseUsage:
    """``usage`` of a response."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens_details: OutputTokensDetails


def response_usage(usage: Usage) -> ResponseUsage:
    """The Responses API's usage."""
    return ResponseUsage(
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        InputTokensDetails(usage.cached_tokens),
        OutputTokensDetails(usage.reasoning_tokens),
    )


@attrs.frozen
class IncompleteDetails:
    """Why a response is ``incomplete``."""

    reason: str


@attrs.frozen
class ResponseError:
    """Why a response ``failed``."""

    code: str
    message: str


@attrs.frozen
class OutputTool:
    """A function tool as the response object echoes it."""

    name: str
    parameters: dict[str, Any] | None
    strict: bool | None
    description: str | None = None
    type: str = "function"


@attrs.frozen
class OutputToolChoice:
    """A named function ``tool_choice`` as the response object echoes it."""

    name: str
    type: str = "function"


@attrs.frozen
class OutputTextFormat:
    """``text.format`` as the response object echoes it."""

    type: str
    name: str | None = None
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


@attrs.frozen
class OutputTextConfig:
    """``text`` as the response object echoes it."""

    format: OutputTextFormat


@attrs.frozen
class OutputReasoning:
    """``reasoning`` as the response object echoes it."""

    effort: str | None = None
    summary: str | None = None


@attrs.frozen
class ResponseBody:
    """The response object (``object: response``), returned whole, streamed in events, and kept when stored."""

    id: str
    created_at: int
    model: str
    status: str
    output: list[OutputItem]
    tools: list[OutputTool]
    tool_choice: str | OutputToolChoice
    parallel_tool_calls: bool
    text: OutputTextConfig
    reasoning: OutputReasoning
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: ResponseError | None = None
    instructions: str | None = None
    metadata: dict[str, str] = attrs.field(factory=dict)
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    store: bool = True
    background: bool = False
    user: str | None = None
    truncation: str = "disabled"
    service_tier: str = "default"
    object: str = "response"


def response_shell(
    request: ResponsesRequest, response_id: str, created_at: int, model: str, *, status: str = "in_progress"
) -> ResponseBody:
    """The response object before any output: the request's settings echoed as OpenAI echoes them."""
    choice = request.tool_choice
    echoed_choice: str | OutputToolChoice = (
        OutputToolChoice(choice.name or "") if isinstance(choice, FunctionChoice) else (choice or "auto")
    )
    text_format = request.text.format if request.text is not None else TextFormat()
    return ResponseBody(
        id=response_id,
        created_at=created_at,
        model=model,
        status=status,
        output=[],
        tools=[OutputTool(t.name or "", t.parameters, t.strict, t.description) for t in request.tools or ()],
        tool_choice=echoed_choice,
        parallel_tool_calls=request.parallel_tool_calls is not False,
        text=OutputTextConfig(
            OutputTextFormat(
                text_format.type, text_format.name, text_format.schema, text_format.description, text_format.strict
            )
        ),
        reasoning=OutputReasoning(None if request.reasoning is None else request.reasoning.effort),
        instructions=request.instructions,
        metadata=dict(request.metadata or {}),
        temperature=request.temperature,
        top_p=request.top_p,
        max_output_tokens=request.max_output_tokens,
        previous_response_id=request.previous_response_id,
        store=request.keeps,
        user=request.user,
    )


@attrs.frozen
class DeletedResponse:
    """Body of ``DELETE /v1/responses/{id}``."""

    id: str
    deleted: bool = True
    object: str = "response"


@attrs.frozen
class InputItemList:
    """Body of ``GET /v1/responses/{id}/input_items``: a page of the response's input items."""

    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: str = "list"
