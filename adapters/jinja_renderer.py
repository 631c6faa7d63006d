"""Chat templates rendered with sandboxed Jinja, the way ``transformers`` renders them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, NoReturn

import attrs
import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from domain.errors import InvalidRequestError
from domain.messages import ChatMessage
from domain.tools import FunctionTool

FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""Used when neither ``--chat-template`` nor the tokenizer provides a template."""


def _raise_exception(message: str) -> NoReturn:
    """What templates call to reject a conversation (e.g. roles that do not alternate)."""
    raise InvalidRequestError(message, param="messages")


def _tojson(value: Any, indent: int | None = None, *, ensure_ascii: bool = False, sort_keys: bool = False) -> str:  # noqa: ANN401  templates pass anything
    """``tojson`` as HF templates expect it: no HTML escaping, unicode kept."""
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(format_: str) -> str:
    """The current date, which some templates (Llama 3) print."""
    return datetime.now(tz=UTC).strftime(format_)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@attrs.frozen
class JinjaTemplateRenderer:
    """The ``TemplateRenderer``: one compiled template plus the special tokens it may print."""

    source: str
    bos_token: str = ""
    eos_token: str = ""
    _template: jinja2.Template = attrs.field(init=False, repr=False)
    _supports_tools: bool = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        environment = _environment()
        try:
            template = environment.from_string(self.source)
            variables = jinja2.meta.find_undeclared_variables(environment.parse(self.source))
        except jinja2.TemplateSyntaxError as error:
            msg = f"invalid chat template (line {error.lineno}): {error.message}"
            raise ValueError(msg) from error
        object.__setattr__(self, "_template", template)
        object.__setattr__(self, "_supports_tools", "tools" in variables)

    @property
    def supports_tools(self) -> bool:
        """The template reads the ``tools`` variable, as tool-calling HuggingFace templates do."""
        return self._supports_tools

    @classmethod
    def choose(
        cls, *, override: str | None, tokenizer_template: str | None, bos_token: str | None, eos_token: str | None
    ) -> JinjaTemplateRenderer:
        """The ``--chat-template`` file's text, else the tokenizer's template, else the simple fallback."""
        source = override or tokenizer_template or FALLBACK_TEMPLATE
        return cls(source, bos_token or "", eos_token or "")

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool,
        tools: Sequence[FunctionTool] = (),
        options: Mapping[str, object] | None = None,
    ) -> str:
        """The prompt text for ``messages``; ``tools`` (HF's shape, ``None`` when there are none) for templates.

        ``options`` become template variables, as ``apply_chat_template``'s extra keyword arguments do; they never
        replace the variables the renderer sets itself.
        """
        try:
            return self._template.render(
                dict(options or {})
                | {
                    "messages": [_message(m) for m in messages],
                    "tools": [tool.to_json() for tool in tools] or None,
                    "add_generation_prompt": add_generation_prompt,
                    "bos_token": self.bos_token,
                    "eos_token": self.eos_token,
                }
            )
        except InvalidRequestError:
            raise
        except jinja2.TemplateError as error:
            msg = f"the chat template could not render these messages: {error}"
            raise InvalidRequestError(msg, param="messages") from error


def _message(message: ChatMessage) -> dict[str, Any]:
    """A message as HF templates read it: tool calls with their arguments as a value, tool results with their id."""
    payload: dict[str, Any] = {"role": str(message.role), "content": message.content}
    if message.name:
        payload["name"] = message.name
    if message.tool_calls:
        payload["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments_value()},
            }
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        payload["tool_call_id"] = message.tool_call_id
    if message.reasoning:
        payload["reasoning_content"] = message.reasoning
    return payload
