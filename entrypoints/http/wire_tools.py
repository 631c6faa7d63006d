"""The OpenAI wire shapes of tools, tool calls and ``response_format``, and their mapping to the domain."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import attrs
import jsonschema
import jsonschema.validators

from domain.errors import InvalidRequestError
from domain.generation import OutputConstraint
from domain.tools import FunctionTool, ToolCall, ToolChoice, ToolChoiceMode

_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
"""OpenAI's rule for function names."""


def check_json_schema(schema: dict[str, Any], param: str) -> None:
    """Reject ``schema`` when it is not a valid JSON Schema (against its declared draft, 2020-12 by default)."""
    if not isinstance(schema.get("$schema", ""), str):
        msg = f"{param} is not a valid JSON Schema: '$schema' must be a string"
        raise InvalidRequestError(msg, param=param)
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.path)
        msg = f"{param} is not a valid JSON Schema: {error.message}" + (f" (at {where[1:]})" if where else "")
        raise InvalidRequestError(msg, param=param) from error


@attrs.frozen(kw_only=True)
class JsonSchemaFormat:
    """``response_format.json_schema``: a named schema the answer must match (``strict`` is always honoured)."""

    name: str
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


@attrs.frozen(kw_only=True)
class ResponseFormat:
    """``response_format``: free text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> OutputConstraint | None:
        """The output constraint it asks for: ``None`` for text; a schema of ``None`` means any JSON object."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return OutputConstraint()
        if self.json_schema is None:
            msg = "response_format.json_schema is required when response_format.type is 'json_schema'"
            raise InvalidRequestError(msg, param="response_format")
        schema = self.json_schema.schema
        if schema is None:
            return OutputConstraint()
        check_json_schema(schema, "response_format")
        return OutputConstraint(json_schema=schema)


@attrs.frozen(kw_only=True)
class FunctionDefinition:
    """A function offered as a tool."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


@attrs.frozen(kw_only=True)
class ToolDefinition:
    """One of ``tools``: ``{"type": "function", "function": {...}}``."""

    type: Literal["function"] = "function"
    function: FunctionDefinition

    def to_domain(self, index: int) -> FunctionTool:
        """The domain tool, its name and parameter schema checked."""
        function = self.function
        if not _FUNCTION_NAME.match(function.name):
            msg = f"tools[{index}].function.name must be 1 to 64 letters, digits, '_' or '-', got {function.name!r}"
            raise InvalidRequestError(msg, param=f"tools[{index}].function.name")
        if function.parameters is not None:
            check_json_schema(function.parameters, f"tools[{index}].function.parameters")
        return FunctionTool(function.name, function.description, function.parameters)


@attrs.frozen(kw_only=True)
class NamedFunction:
    """The function a named ``tool_choice`` forces."""

    name: str


@attrs.frozen(kw_only=True)
class NamedToolChoice:
    """``tool_choice: {"type": "function", "function": {"name": ...}}``: call exactly this function."""

    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoiceBody = Literal["none", "auto", "required"] | NamedToolChoice


def tool_choice(body: ToolChoiceBody | None, *, has_tools: bool) -> ToolChoice:
    """The domain tool choice; unset means ``auto`` with tools, ``none`` without (OpenAI's defaults)."""
    if isinstance(body, NamedToolChoice):
        return ToolChoice(ToolChoiceMode.REQUIRED, body.function.name)
    if body is None:
        return ToolChoice(ToolChoiceMode.AUTO if has_tools else ToolChoiceMode.NONE)
    return ToolChoice(ToolChoiceMode(body))


@attrs.frozen(kw_only=True)
class FunctionCallBody:
    """The function a tool call invokes, with its arguments as JSON text."""

    name: str
    arguments: str


@attrs.frozen(kw_only=True)
class ToolCallBody:
    """A tool call in an assistant message (sent back in ``messages``, and returned in ``message.tool_calls``)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallBody

    def to_domain(self) -> ToolCall:
        """The domain tool call."""
        return ToolCall(self.id, self.function.name, self.function.arguments)


@attrs.frozen(kw_only=True)
class ToolCallDeltaBody:
    """A tool call in a streamed ``delta.tool_calls``: sent whole, once complete, with its position in the answer."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallBody


@attrs.frozen
class FunctionCallingMessage:
    """The answer's ``message`` to a legacy ``functions`` request that called one: ``function_call``, not tools."""

    content: str | None
    function_call: FunctionCallBody
    role: str = "assistant"


@attrs.frozen
class ToolCallingMessage:
    """The answer's ``message`` when it called tools: ``content`` is ``null`` unless the model also wrote text."""

    content: str | None
    tool_calls: list[ToolCallBody]
    role: str = "assistant"


LegacyFunctionCallBody = Literal["none", "auto"] | NamedFunction
"""The legacy ``function_call``: ``"none"``, ``"auto"`` or ``{"name": ...}``."""


def legacy_tools(functions: Sequence[FunctionDefinition]) -> list[ToolDefinition]:
    """The legacy ``functions`` as the ``tools`` they became."""
    return [ToolDefinition(function=function) for function in functions]


def legacy_tool_choice(body: LegacyFunctionCallBody | None) -> ToolChoiceBody | None:
    """The legacy ``function_call`` as the ``tool_choice`` it became."""
    if isinstance(body, NamedFunction):
        return NamedToolChoice(function=body)
    return body


def function_call_body(call: ToolCall) -> FunctionCallBody:
    """A call as the legacy ``function_call`` (no id: legacy clients answer it by name)."""
    return FunctionCallBody(name=call.name, arguments=call.arguments)


def tool_call_bodies(calls: Sequence[ToolCall]) -> list[ToolCallBody]:
    """``message.tool_calls``."""
    return [ToolCallBody(id=c.id, function=FunctionCallBody(name=c.name, arguments=c.arguments)) for c in calls]


def tool_call_deltas(calls: Sequence[ToolCall], first: int) -> list[ToolCallDeltaBody]:
    """``delta.tool_calls`` for calls numbered from ``first`` in their choice."""
    return [
        ToolCallDeltaBody(index=first + n, id=c.id, function=FunctionCallBody(name=c.name, arguments=c.arguments))
        for n, c in enumerate(calls)
    ]
