"""Tool calling in the Hermes format (Qwen, Hermes, SmolLM3): describing tools, constraining and parsing calls.

The model writes each call as ``<tool_call>``, a newline, ``{"name": ..., "arguments": {...}}``, a newline, and
``</tool_call>``. Templates that do not show ``tools`` themselves get the tools described in the system prompt, in
the same format (``<tools>...</tools>``), and the conversation's earlier calls and results written as
``<tool_call>`` and ``<tool_response>`` blocks.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence

import attrs

from domain.errors import InvalidRequestError
from domain.generation import Choice, CompletionStream, FinishReason, OutputConstraint, TextDelta
from domain.messages import ChatMessage, Role
from domain.tools import FunctionTool, ToolCall, ToolChoiceMode, ToolUse

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOL_RESPONSE_OPEN = "<tool_response>"
TOOL_RESPONSE_CLOSE = "</tool_response>"

_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


def check_tool_use(use: ToolUse) -> None:
    """Reject a ``tool_choice`` that cannot be honoured with the offered tools, and tools named twice."""
    names = [tool.name for tool in use.tools]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        msg = f"tools must have distinct names; repeated: {', '.join(repeated)}"
        raise InvalidRequestError(msg, param="tools")
    wanted = use.choice.function
    if wanted is not None and wanted not in names:
        msg = f"tool_choice names the function {wanted!r}, which is not among the tools ({', '.join(names) or 'none'})"
        raise InvalidRequestError(msg, param="tool_choice")
    if use.choice.mode is ToolChoiceMode.REQUIRED and not names:
        raise InvalidRequestError("tool_choice 'required' needs at least one tool in tools", param="tool_choice")


def tool_prompt(use: ToolUse) -> str:
    """The system-prompt text that offers ``use.offered`` and says how to call them."""
    described = "\n".join(json.dumps(tool.to_json(), ensure_ascii=False) for tool in use.offered)
    prompt = _PROMPT.format(tools=described)
    if use.choice.function is not None:
        prompt += f"\n\nYou must call the function {use.choice.function!r}."
    elif use.choice.mode is ToolChoiceMode.REQUIRED:
        prompt += "\n\nYou must call at least one function."
    if not use.parallel:
        prompt += "\nCall at most one function."
    return prompt


def describe_tools(messages: Sequence[ChatMessage], use: ToolUse) -> list[ChatMessage]:
    """``messages`` for a template that knows nothing of tools.

    The offered tools are described in the system prompt, earlier calls written into the assistant's text, and tool
    results sent back as ``<tool_response>`` user turns.
    """
    rewritten = _history_as_text(messages)
    if not use.offered:
        return rewritten
    prompt = tool_prompt(use)
    first = rewritten[0] if rewritten else None
    if first is not None and first.role in {Role.SYSTEM, Role.DEVELOPER}:
        joined = f"{first.content}\n\n{prompt}" if first.content else prompt
        return [attrs.evolve(first, content=joined), *rewritten[1:]]
    return [ChatMessage(Role.SYSTEM, prompt), *rewritten]


def _history_as_text(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    result: list[ChatMessage] = []
    for message in messages:
        if message.role is Role.TOOL:
            response = f"{TOOL_RESPONSE_OPEN}\n{message.content}\n{TOOL_RESPONSE_CLOSE}"
            previous = result[-1] if result else None
            if previous is not None and previous.role is Role.USER and previous.content.endswith(TOOL_RESPONSE_CLOSE):
                result[-1] = attrs.evolve(previous, content=f"{previous.content}\n{response}")
            else:
                result.append(ChatMessage(Role.USER, response))
        elif message.tool_calls:
            calls = "\n".join(format_tool_call(call) for call in message.tool_calls)
            content = f"{message.content}\n{calls}" if message.content else calls
            result.append(attrs.evolve(message, content=content, tool_calls=()))
        else:
            result.append(message)
    return result


def format_tool_call(call: ToolCall) -> str:
    """A call as the model writes it."""
    body = {"name": call.name, "arguments": call.arguments_value()}
    return f"{TOOL_CALL_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def tool_constraint(use: ToolUse, answer: OutputConstraint | None = None) -> OutputConstraint | None:
    """The grammar of the answer, given the request's own constraint on it (``response_format``), if any.

    A forced answer is ``<tool_call>`` blocks calling the offered (or the named) function(s). When the model may
    choose and the answer is constrained, it is either such calls or an answer that follows ``answer``, as at
    OpenAI; otherwise ``answer`` stands as it is.
    """
    if not use.offered or (answer is None and not use.forced):
        return answer
    wanted = use.choice.function
    tools = [tool for tool in use.offered if wanted is None or tool.name == wanted]
    calls = OutputConstraint(
        json_schema=call_schema(tools),
        wrapper=(f"{TOOL_CALL_OPEN}\n", f"\n{TOOL_CALL_CLOSE}"),
        repeat=wanted is None and use.parallel,
        param="tools",
    )
    if use.forced:
        return calls
    if answer is not None and answer.grammar is not None:
        msg = f"{answer.param}: a grammar cannot be combined with tools the model may call; use tool_choice 'none'"
        raise InvalidRequestError(msg, param=answer.param)
    return attrs.evolve(calls, alternative=answer)


def call_schema(tools: Sequence[FunctionTool]) -> dict[str, object]:
    """JSON Schema of one call of any of ``tools``: ``{"name": <one of them>, "arguments": <its parameters>}``.

    Each tool's parameters move under ``$defs`` (their own ``$ref``s rewritten to match), so schemas with
    definitions of their own keep working.
    """
    definitions: dict[str, object] = {}
    variants: list[dict[str, object]] = []
    for number, tool in enumerate(tools):
        key = f"tool{number}_arguments"
        definitions[key] = _rebase_refs(tool.arguments_schema(), f"#/$defs/{key}")
        variants.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": {"$ref": f"#/$defs/{key}"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, object] = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return schema | {"$defs": definitions}


def _rebase_refs(node: object, base: str) -> object:
    """``node`` with local ``$ref``s (``#...``) pointing into it from its new place, ``base``."""
    if isinstance(node, Mapping):
        rebased: dict[str, object] = {}
        for key, value in node.items():
            local = key == "$ref" and isinstance(value, str) and value.startswith("#")
            rebased[key] = base + value[1:] if local else _rebase_refs(value, base)
        return rebased
    if isinstance(node, list):
        return [_rebase_refs(item, base) for item in node]
    return node


def new_call_id() -> str:
    """A fresh id for a tool call, in OpenAI's style."""
    return f"call_{uuid.uuid4().hex[:24]}"


@attrs.define
class ToolCallParser:
    """Splits a choice's text, as it streams, into the answer's text and the tool calls it makes.

    Text that may be the start of a ``<tool_call>`` is held back until it is known, so markup never reaches the
    answer; so is whitespace at the end of the text, dropped when the answer turns out to be tool calls. An answer
    that starts with ``{`` is held to the end: a bare ``{"name": ..., "arguments"|"parameters": ...}`` object (or a
    list of them) naming an offered tool is read as calls too (the Llama 3 format). Malformed calls stay text.
    """

    tool_names: frozenset[str]
    forced: bool = False
    """The answer may only be calls (a forced ``tool_choice``): any other text, even a cut-off call, is markup."""
    content: str = ""
    calls: list[ToolCall] = attrs.Factory(list)
    _pending: str = ""
    _held: str = ""
    _started: bool = False
    _bare: bool = False

    def push(self, text: str) -> tuple[str, tuple[ToolCall, ...]]:
        """Add streamed text; return the answer text and the calls that became certain."""
        self._pending += text
        return self._drain(final=False)

    def flush(self) -> tuple[str, tuple[ToolCall, ...]]:
        """Whatever is still held back, now that the text is complete."""
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> tuple[str, tuple[ToolCall, ...]]:
        released: list[str] = []
        found: list[ToolCall] = []
        if not self._started:
            begun = self._pending.lstrip()
            if not begun and not final:
                return "", ()
            self._started = True
            self._bare = begun.startswith("{") and bool(self.tool_names)
        if self._bare:
            if final:
                bare = _bare_calls(self._pending, self.tool_names)
                if bare:
                    found, self._pending = bare, ""
                else:
                    released.append(self._release(self._pending))
                    self._pending = ""
        else:
            self._scan(released, found, final=final)
        if final and not found and not self.calls:
            released.append(self._held)
            self.content += self._held
            self._held = ""
        self.calls.extend(found)
        return "".join(released), tuple(found)

    def _scan(self, released: list[str], found: list[ToolCall], *, final: bool) -> None:
        while True:
            start = self._pending.find(TOOL_CALL_OPEN)
            if start < 0:
                keep = 0 if final else _partial_suffix(self._pending, TOOL_CALL_OPEN)
                cut = len(self._pending) - keep
                released.append(self._release(self._pending[:cut]))
                self._pending = self._pending[cut:]
                return
            released.append(self._release(self._pending[:start]))
            self._pending = self._pending[start:]
            end = self._pending.find(TOOL_CALL_CLOSE)
            if end < 0:
                if final:
                    call = _call(self._pending[len(TOOL_CALL_OPEN) :])
                    if call is not None:
                        found.append(call)
                    else:
                        released.append(self._release(self._pending))
                    self._pending = ""
                return
            block = self._pending[: end + len(TOOL_CALL_CLOSE)]
            call = _call(block[len(TOOL_CALL_OPEN) : end])
            if call is not None:
                found.append(call)
            else:
                released.append(self._release(block))
            self._pending = self._pending[len(block) :]

    def _release(self, text: str) -> str:
        """Answer text, less the whitespace at its end, which waits to see what follows."""
        if self.forced:
            return ""
        text = self._held + text
        kept = text.rstrip()
        self._held = text[len(kept) :]
        self.content += kept
        return kept


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    return next((size for size in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:size])), 0)


def _call(body: str) -> ToolCall | None:
    """The call in a ``<tool_call>`` block, or ``None`` when it is not a JSON call."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return _call_of(value)


def _call_of(value: object) -> ToolCall | None:
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except ValueError:
            return None
        return ToolCall(new_call_id(), name, arguments)
    return ToolCall(new_call_id(), name, json.dumps(arguments, ensure_ascii=False))


def _bare_calls(text: str, names: frozenset[str]) -> list[ToolCall]:
    """Calls written as a bare JSON object or list of objects, all naming offered tools; else none."""
    try:
        value = json.loads(text)
    except ValueError:
        return []
    items = value if isinstance(value, list) else [value]
    calls = [
        _call_of(item) if isinstance(item, dict) and ("arguments" in item or "parameters" in item) else None
        for item in items
    ]
    if not calls or any(call is None or call.name not in names for call in calls):
        return []
    return [call for call in calls if call is not None]


def parse_tool_calls(text: str, tool_names: Iterable[str], *, forced: bool = False) -> tuple[str, tuple[ToolCall, ...]]:
    """The answer text and the tool calls in a complete choice text."""
    parser = ToolCallParser(frozenset(tool_names), forced)
    parser.push(text)
    parser.flush()
    return parser.content, tuple(parser.calls)


async def extract_tool_calls(
    events: CompletionStream, tool_names: Iterable[str], *, forced: bool = False
) -> CompletionStream:
    """``events`` with each choice's tool calls taken out of its text: on the deltas, the choice and the completion.

    A choice that called tools and ended on its own finishes with ``tool_calls``. When calls are ``forced``, no
    text reaches the answer, not even a call cut off by ``max_tokens``.
    """
    names = frozenset(tool_names)
    parsers: dict[int, ToolCallParser] = {}
    finished: dict[int, Choice] = {}
    prompts: dict[int, int] = {}
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, TextDelta):
                prompts[event.index] = event.prompt_tokens
                parser = parsers.setdefault(event.index, ToolCallParser(names, forced))
                text, calls = parser.push(event.text)
                yield attrs.evolve(event, text=text, tool_calls=calls)
            elif isinstance(event, Choice):
                parser = parsers.setdefault(event.index, ToolCallParser(names, forced))
                text, calls = parser.flush()
                if text or calls:
                    yield TextDelta(
                        text,
                        event.index,
                        tool_calls=calls,
                        prompt_tokens=prompts.get(event.index, 0),
                        completion_tokens=event.completion_tokens,
                    )
                called = bool(parser.calls) and event.finish_reason is FinishReason.STOP
                choice = attrs.evolve(
                    event,
                    text=parser.content,
                    tool_calls=tuple(parser.calls),
                    finish_reason=FinishReason.TOOL_CALLS if called else event.finish_reason,
                )
                finished[event.index] = choice
                yield choice
            else:
                yield attrs.evolve(event, choices=tuple(finished.get(c.index, c) for c in event.choices))
