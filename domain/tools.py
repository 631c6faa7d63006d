"""Function tools a chat request offers the model, how it may use them, and the calls it makes."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping

import attrs


@attrs.frozen
class FunctionTool:
    """A function the model may call: its name, what it does, and the JSON Schema of its arguments."""

    name: str
    description: str | None = None
    parameters: Mapping[str, object] | None = None
    """JSON Schema of the arguments object; ``None`` means the function takes no arguments."""

    def to_json(self) -> dict[str, object]:
        """The tool as OpenAI sends it and HuggingFace chat templates read it: ``{"type": "function", ...}``."""
        function: dict[str, object] = {"name": self.name}
        if self.description is not None:
            function["description"] = self.description
        function["parameters"] = dict(self.parameters) if self.parameters is not None else ARGUMENTLESS
        return {"type": "function", "function": function}

    def arguments_schema(self) -> dict[str, object]:
        """The schema a call's ``arguments`` must match: a function without ``parameters`` takes none (``{}``)."""
        return dict(self.parameters) if self.parameters is not None else NO_ARGUMENTS


ARGUMENTLESS: dict[str, object] = {"type": "object", "properties": {}}
"""The arguments schema shown for a function that declares none."""
NO_ARGUMENTS: dict[str, object] = ARGUMENTLESS | {"additionalProperties": False}
"""What a call of a function that declares no arguments may pass: the empty object."""


class ToolChoiceMode(enum.StrEnum):
    """OpenAI's ``tool_choice`` strings."""

    NONE = "none"
    """Never call a tool: tools are not shown to the model and its output is not parsed for calls."""
    AUTO = "auto"
    """The model decides between answering and calling tools."""
    REQUIRED = "required"
    """The model must call one or more tools."""


@attrs.frozen
class ToolChoice:
    """How the model may use the offered tools; ``function`` names the one function it must call."""

    mode: ToolChoiceMode = ToolChoiceMode.AUTO
    function: str | None = None


@attrs.frozen
class ToolUse:
    """What a chat request says about tools: the offered functions, the choice, and whether calls may be parallel."""

    tools: tuple[FunctionTool, ...] = ()
    choice: ToolChoice = ToolChoice()
    parallel: bool = True

    @property
    def offered(self) -> tuple[FunctionTool, ...]:
        """The tools the model gets to see: none when ``tool_choice`` is ``"none"``."""
        return () if self.choice.mode is ToolChoiceMode.NONE else self.tools

    @property
    def forced(self) -> bool:
        """The answer must be tool calls (``"required"`` or a named function)."""
        return bool(self.offered) and (self.choice.mode is ToolChoiceMode.REQUIRED or self.choice.function is not None)


NO_TOOLS = ToolUse()


@attrs.frozen
class ToolCall:
    """A call the model made: an id the client echoes back with the result, the function, its JSON arguments."""

    id: str
    name: str
    arguments: str
    """The arguments object as JSON text, as OpenAI returns it."""

    def arguments_value(self) -> object:
        """The arguments as a value (chat templates print them with ``tojson``); text that is not JSON stays text."""
        try:
            return json.loads(self.arguments)
        except ValueError:
            return self.arguments
