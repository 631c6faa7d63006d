"""What the llguidance grammars of output constraints accept, token by token, with a real tokenizer."""

from __future__ import annotations

import json

import pytest

from adapters.huggingface.constraints import GrammarCompiler
from application.tools import tool_constraint
from domain.errors import InvalidRequestError
from domain.generation import OutputConstraint
from domain.tools import FunctionTool, ToolChoice, ToolChoiceMode, ToolUse
from tests.tiny_model import build_tokenizer

WEATHER = FunctionTool(
    "get_weather",
    parameters={
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
)
TIME = FunctionTool("get_time")
ANSWER = OutputConstraint(
    {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
)


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    tokenizer = build_tokenizer()
    return GrammarCompiler(tokenizer, len(tokenizer), (tokenizer.eos_token_id,))


def accepts(compiler: GrammarCompiler, constraint: OutputConstraint, text: str) -> bool:
    """Whether ``text`` is a complete output the grammar allows."""
    matcher = compiler.matcher(constraint)
    tokens = compiler.tokenizer.encode(text, add_special_tokens=False)
    return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


def call(name: str, arguments: dict) -> str:
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


def test_a_function_without_parameters_is_called_with_no_arguments(compiler: GrammarCompiler) -> None:
    named = ToolUse((TIME,), ToolChoice(ToolChoiceMode.REQUIRED, "get_time"))
    constraint = tool_constraint(named)
    assert constraint is not None
    assert accepts(compiler, constraint, call("get_time", {}))
    assert not accepts(compiler, constraint, call("get_time", {"zone": "UTC"}))
    assert not accepts(compiler, constraint, call("get_time", {"type": "object", "properties": {}}))


def test_auto_tools_with_a_schema_allow_a_call_or_an_answer_that_follows_the_schema(
    compiler: GrammarCompiler,
) -> None:
    constraint = tool_constraint(ToolUse((WEATHER, TIME)), ANSWER)
    assert constraint is not None
    assert accepts(compiler, constraint, call("get_weather", {"city": "Paris"}))
    assert accepts(compiler, constraint, call("get_weather", {"city": "Paris"}) + "\n" + call("get_time", {}))
    assert accepts(compiler, constraint, json.dumps({"answer": "sunny"}))
    assert not accepts(compiler, constraint, json.dumps({"other": "sunny"}))
    assert not accepts(compiler, constraint, "It is sunny.")


def test_auto_tools_without_a_constraint_leave_the_answer_free() -> None:
    assert tool_constraint(ToolUse((WEATHER,))) is None
    assert tool_constraint(ToolUse((WEATHER,), ToolChoice(ToolChoiceMode.NONE)), ANSWER) == ANSWER


def test_a_grammar_beside_tools_the_model_may_call_is_refused() -> None:
    with pytest.raises(InvalidRequestError):
        tool_constraint(ToolUse((WEATHER,)), OutputConstraint(grammar='start: "yes"', param="grammar"))


def test_a_regex_constraint_allows_only_matching_text(compiler: GrammarCompiler) -> None:
    constraint = OutputConstraint(regex=r"[0-9]{3}-[a-z]+")
    assert accepts(compiler, constraint, "123-abc")
    assert not accepts(compiler, constraint, "12-abc")


def test_a_choice_constraint_allows_exactly_one_of_the_choices(compiler: GrammarCompiler) -> None:
    constraint = OutputConstraint(choices=("yes", "no", "maybe so"))
    for choice in ("yes", "no", "maybe so"):
        assert accepts(compiler, constraint, choice)
    assert not accepts(compiler, constraint, "yesno")
    assert not accepts(compiler, constraint, "maybe")


@pytest.mark.parametrize(
    "grammar",
    [
        'root ::= "yes" | "no" | digits\ndigits ::= [0-9]+',  # llama.cpp's GBNF
        'start: "yes" | "no" | DIGITS\nDIGITS: /[0-9]+/',  # Lark
    ],
)
def test_a_gbnf_or_lark_grammar_is_enforced(compiler: GrammarCompiler, grammar: str) -> None:
    constraint = OutputConstraint(grammar=grammar)
    assert accepts(compiler, constraint, "yes")
    assert accepts(compiler, constraint, "42")
    assert not accepts(compiler, constraint, "maybe")


def test_a_broken_grammar_is_a_400_naming_its_field(compiler: GrammarCompiler) -> None:
    with pytest.raises(InvalidRequestError) as error:
        compiler.check(OutputConstraint(grammar="root ::= (", param="grammar"))
    assert error.value.param == "grammar"
