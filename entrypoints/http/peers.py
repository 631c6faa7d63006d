"""Request extras of the peers users arrive from: vLLM's structured outputs and llama.cpp's grammars.

Each names an output constraint in its own words; ``output_constraint`` turns whichever one a request sent (with
OpenAI's ``response_format``) into the domain's ``OutputConstraint``, and refuses a request that sends two.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from domain.errors import InvalidRequestError
from domain.generation import OutputConstraint
from entrypoints.http.wire_tools import ResponseFormat, check_json_schema


@attrs.frozen(kw_only=True)
class StructuredOutputs:
    """vLLM's ``structured_outputs``: exactly one of a JSON Schema, a regex, a choice of strings or a grammar."""

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


def _json_schema(value: dict[str, Any] | str, param: str) -> OutputConstraint:
    """A JSON Schema given as an object or as JSON text (vLLM accepts both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            msg = f"{param} is not valid JSON: {error}"
            raise InvalidRequestError(msg, param=param) from error
        if not isinstance(value, dict):
            msg = f"{param} must be a JSON Schema object"
            raise InvalidRequestError(msg, param=param)
    check_json_schema(value, param)
    return OutputConstraint(json_schema=value, param=param)


def _choices(value: list[str], param: str) -> OutputConstraint:
    if not value:
        msg = f"{param} must hold at least one choice"
        raise InvalidRequestError(msg, param=param)
    return OutputConstraint(choices=tuple(value), param=param)


def structured_constraints(outputs: StructuredOutputs) -> dict[str, OutputConstraint]:
    """The constraints ``structured_outputs`` asks for, by the field that asks."""
    found: dict[str, OutputConstraint] = {}
    if outputs.json is not None:
        found["structured_outputs.json"] = _json_schema(outputs.json, "structured_outputs.json")
    if outputs.regex is not None:
        found["structured_outputs.regex"] = OutputConstraint(regex=outputs.regex, param="structured_outputs.regex")
    if outputs.choice is not None:
        found["structured_outputs.choice"] = _choices(outputs.choice, "structured_outputs.choice")
    if outputs.grammar is not None:
        found["structured_outputs.grammar"] = OutputConstraint(
            grammar=outputs.grammar, param="structured_outputs.grammar"
        )
    if outputs.json_object:
        found["structured_outputs.json_object"] = OutputConstraint(param="structured_outputs.json_object")
    return found


@attrs.frozen(kw_only=True)
class ConstraintFields:
    """Every field that may constrain the output: OpenAI's, vLLM's (current and older) and llama.cpp's."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None

    def output_constraint(self) -> OutputConstraint | None:
        """The one constraint the request asks for (``None``: free text); two at once are a 400 naming both."""
        found: dict[str, OutputConstraint] = {}
        if self.response_format is not None and (constraint := self.response_format.constraint()) is not None:
            found["response_format"] = constraint
        if self.structured_outputs is not None:
            found |= structured_constraints(self.structured_outputs)
        if self.guided_json is not None:
            found["guided_json"] = _json_schema(self.guided_json, "guided_json")
        if self.guided_regex is not None:
            found["guided_regex"] = OutputConstraint(regex=self.guided_regex, param="guided_regex")
        if self.guided_choice is not None:
            found["guided_choice"] = _choices(self.guided_choice, "guided_choice")
        if self.guided_grammar is not None:
            found["guided_grammar"] = OutputConstraint(grammar=self.guided_grammar, param="guided_grammar")
        if self.grammar is not None:
            found["grammar"] = OutputConstraint(grammar=self.grammar, param="grammar")
        if self.json_schema is not None:
            found["json_schema"] = _json_schema(self.json_schema, "json_schema")
        if len(found) > 1:
            names = sorted(found)
            msg = f"only one output constraint may be given, got {', '.join(names)}"
            raise InvalidRequestError(msg, param=names[1])
        return next(iter(found.values()), None)
