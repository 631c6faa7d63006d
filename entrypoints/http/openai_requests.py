"""OpenAI's request bodies (chat and text completions), their checks, and their mapping onto the domain."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import attrs
from attrs import validators as v

from domain.errors import InvalidRequestError
from domain.generation import GenerationParams
from domain.messages import ChatMessage, Conversation, Role
from domain.options import Kind, Option, option, read_options
from domain.tools import ToolUse
from entrypoints.http.peers import ConstraintFields
from entrypoints.http.wire_tools import (
    FunctionCallBody,
    FunctionDefinition,
    LegacyFunctionCallBody,
    ToolCallBody,
    ToolChoiceBody,
    ToolDefinition,
    legacy_tool_choice,
    legacy_tools,
    tool_choice,
)


def _not_yet(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """Accept the OpenAI default (what SDKs and LangChain send), refuse what this server cannot honour yet."""
    if value:
        msg = f"'{attribute.name}' is not supported yet; leave it unset or zero"
        raise ValueError(msg)


MAX_CHOICES = 64
MAX_TOP_LOGPROBS = 20


def _token_biases(_instance: object, attribute: attrs.Attribute[Any], value: dict[str, float]) -> None:
    """``logit_bias`` maps token ids, written as strings, to biases in [-100, 100]; every bad entry is named."""
    keys = [token for token in value if not token.isdigit()]
    biases = [
        f"{token!r}: {bias}"
        for token, bias in value.items()
        if not (math.isfinite(bias) and -100 <= bias <= 100)  # noqa: PLR2004  OpenAI's range
    ]
    problems = []
    if keys:
        problems.append(f"keys must be token ids, got {', '.join(repr(token) for token in keys)}")
    if biases:
        problems.append(f"values must be in [-100, 100], got {', '.join(biases)}")
    if problems:
        msg = f"'{attribute.name}' {'; '.join(problems)}"
        raise ValueError(msg)


def _token_ids(_instance: object, attribute: attrs.Attribute[Any], value: list[int]) -> None:
    negative = [token for token in value if token < 0]
    if negative:
        msg = f"'{attribute.name}' must hold token ids (>= 0), got {negative}"
        raise ValueError(msg)


def _some_token_ids(instance: object, attribute: attrs.Attribute[Any], value: list[int]) -> None:
    if not value:
        msg = f"'{attribute.name}' must hold at least one token id"
        raise ValueError(msg)
    _token_ids(instance, attribute, value)


def ranged(low: float | None = None, high: float | None = None, *, default: Any = None) -> Any:  # noqa: ANN401
    """A number field checked against ``[low, high]`` (finite), in the options table's words and published schema."""
    bounds = Option(name="", kind=Kind.NUMBER, doc="", low=low, high=high)

    def check(_instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
        if value is not None and not bounds.holds(value):
            msg = f"`{attribute.name}` must be {bounds.requirement}, got {value!r}."
            raise InvalidRequestError(msg, param=attribute.name)

    limits = {name: bound for name, bound in (("minimum", low), ("maximum", high)) if bound is not None}
    return attrs.field(default=default, validator=check, metadata={"schema": limits})


def option_field(name: str, *, high: float | None = None) -> Any:  # noqa: ANN401
    """A field for the table's option ``name`` (``domain.options``), checked and published with the table's range.

    ``high`` narrows the range where the dialect's own reference does (OpenAI's temperature stops at 2).
    """
    row = option(name) if high is None else attrs.evolve(option(name), high=high)

    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if value is not None:
            row.check(value, sent_as=attribute.name)

    return attrs.field(default=None, validator=check, metadata={"option": row})


@attrs.frozen(kw_only=True)
class StreamOptions:
    """``stream_options``: OpenAI's switches for a streamed response, and vLLM's usage on every chunk."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


@attrs.frozen(kw_only=True)
class ContentPart:
    """One part of a message's content; only text parts are understood."""

    type: str
    text: str | None = None


@attrs.frozen(kw_only=True)
class Message:
    """A chat message as OpenAI clients send it."""

    role: Role | Literal["function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallBody] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCallBody | None = None
    """A legacy assistant message's call (before ``tool_calls``); its result comes back as a ``function`` message."""
    reasoning_content: str | None = None
    """An earlier answer's thinking, sent back (templates of reasoning models read it)."""

    def to_domain(self, index: int, legacy_call_id: str | None = None) -> ChatMessage:
        """The domain message, with text parts joined; a tool result must say which call it answers.

        Legacy ``function_call``s become tool calls with the id ``legacy_call_id``, and ``function`` results tool
        results answering it.
        """
        if self.role == "function":
            if not self.name:
                msg = f"messages[{index}]: a 'function' message needs the name of the function it answers"
                raise InvalidRequestError(msg, param=f"messages[{index}].name")
            call_id = legacy_call_id or f"call_{self.name}"
            return attrs.evolve(self, role=Role.TOOL, tool_call_id=call_id, name=self.name).to_domain(index)
        if self.function_call is not None and not self.tool_calls:
            call = ToolCallBody(id=legacy_call_id or f"call_{index}", function=self.function_call)
            return attrs.evolve(self, tool_calls=[call], function_call=None).to_domain(index)
        role = Role(self.role)
        if role is Role.TOOL and not self.tool_call_id:
            msg = f"messages[{index}]: a 'tool' message needs the tool_call_id of the call it answers"
            raise InvalidRequestError(msg, param=f"messages[{index}].tool_call_id")
        content = self.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    msg = f"content part type {part.type!r} is not supported; only 'text' parts are"
                    raise InvalidRequestError(msg, param=f"messages[{index}].content")
                parts.append(part.text)
            content = "".join(parts)
        calls = tuple(call.to_domain() for call in self.tool_calls or ())
        return ChatMessage(
            role,
            content or "",
            self.name,
            tool_calls=calls,
            tool_call_id=self.tool_call_id,
            reasoning=self.reasoning_content or "",
        )


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]
"""How hard a reasoning model should think; templates that read ``reasoning_effort`` get it."""


def template_options(kwargs: dict[str, Any] | None, effort: str | None) -> dict[str, Any]:
    """The chat template's extra variables: ``chat_template_kwargs``, and ``reasoning_effort`` when set."""
    return (kwargs or {}) | ({} if effort is None else {"reasoning_effort": effort})


@attrs.frozen(kw_only=True)
class SamplingRequest(ConstraintFields):
    """The fields chat and text completions share: OpenAI's sampling options, HuggingFace's and the peers'.

    The output constraints (``response_format`` and the peers' structured outputs) come from ``ConstraintFields``.
    """

    reads_options: ClassVar[bool] = True
    """Its other fields may carry the options of ``domain.options`` (the published schema lists them)."""
    model: str | None = None
    max_tokens: int | None = ranged(0)
    max_completion_tokens: int | None = ranged(0)
    temperature: float | None = option_field("temperature", high=2)
    top_p: float | None = option_field("top_p")
    n: int = ranged(1, MAX_CHOICES, default=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = option_field("seed")
    presence_penalty: float | None = option_field("presence_penalty")
    frequency_penalty: float | None = option_field("frequency_penalty")
    logit_bias: dict[str, float] | None = attrs.field(default=None, validator=v.optional(_token_biases))
    user: str | None = None
    max_new_tokens: int | None = ranged(0)
    """HuggingFace's ``max_tokens``; the other options of ``domain.options`` come in the request's other fields."""
    # vLLM's and llama.cpp's extras.
    stop_token_ids: list[int] | None = attrs.field(default=None, validator=v.optional(_token_ids))
    allowed_token_ids: list[int] | None = attrs.field(default=None, validator=v.optional(_some_token_ids))
    n_predict: int | None = ranged(-1)
    """llama.cpp's ``max_tokens``; -1 means no limit but the context window."""
    prompt_logprobs: int | None = ranged(0, MAX_TOP_LOGPROBS)
    """vLLM's: each prompt token's logprob with this many alternatives, in ``prompt_logprobs``."""
    return_tokens_as_token_ids: bool = False
    """vLLM's: logprobs name tokens as ``token_id:<id>`` (their text may not be valid UTF-8 alone)."""

    def __attrs_post_init__(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true", param="stream_options")

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk (``stream_options.include_usage``)."""
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Whether every chunk carries the usage so far (vLLM's ``continuous_usage_stats``, with ``include_usage``)."""
        return self.include_usage and self.stream_options is not None and self.stream_options.continuous_usage_stats

    def top_logprobs_wanted(self) -> int | None:
        """How many alternatives to return with each token's logprob; ``None`` when logprobs are not wanted."""
        return None

    def stop_sequences(self) -> tuple[str, ...]:
        """``stop`` as a tuple, whether one string or a list was sent."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def to_params(self, fields: dict[str, Any]) -> GenerationParams:
        """The domain's generation parameters; ``fields`` are the request's other fields (HuggingFace's options...)."""
        predicted = None if self.n_predict is None or self.n_predict < 0 else self.n_predict
        max_new_tokens = next(
            (n for n in (self.max_completion_tokens, self.max_tokens, self.max_new_tokens, predicted) if n is not None),
            None,
        )
        options, extra = read_options(fields)
        return GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=self.stop_sequences(),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias={int(token): bias for token, bias in (self.logit_bias or {}).items()},
            logprobs=self.top_logprobs_wanted(),
            prompt_logprobs=self.prompt_logprobs,
            constraint=self.output_constraint(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            allowed_token_ids=None if self.allowed_token_ids is None else tuple(self.allowed_token_ids),
            options=options,
            extra=extra,
        )


@attrs.frozen(kw_only=True)
class ChatCompletionRequest(SamplingRequest):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[Message] = attrs.field(validator=v.min_len(1))
    logprobs: bool = False
    top_logprobs: int | None = ranged(0, MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoiceBody | None = None
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: ReasoningEffort | None = None
    functions: list[FunctionDefinition] | None = None
    """The legacy ``tools``: answered with ``message.function_call``, one call at most."""
    function_call: LegacyFunctionCallBody | None = None
    """The legacy ``tool_choice``."""
    # vLLM's prompt options.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # OpenAI's options that change the output and that this server does not offer: refused, never ignored.
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        refused = [
            name
            for name, asked in (
                ("audio", self.audio is not None),
                ("modalities", "audio" in (self.modalities or ())),
                ("prediction", self.prediction is not None),
                ("web_search_options", self.web_search_options is not None),
            )
            if asked
        ]
        if refused:
            msg = f"{', '.join(refused)}: not supported by this server (text output only; no prediction or search)"
            raise InvalidRequestError(msg, param=refused[0])

    def top_logprobs_wanted(self) -> int | None:
        """``logprobs: true`` asks for logprobs, ``top_logprobs`` for alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_options(self) -> dict[str, Any]:
        """Variables for the chat template: ``chat_template_kwargs`` and ``reasoning_effort``."""
        return template_options(self.chat_template_kwargs, self.reasoning_effort)

    def conversation(self) -> Conversation:
        """What the chat prompt is rendered from: messages, tools, the template's options."""
        return Conversation(
            messages=tuple(self.chat_messages()),
            tools=self.tool_use(),
            template_options=self.template_options(),
            add_generation_prompt=self.add_generation_prompt,
            continue_final_message=self.continue_final_message,
        )

    def chat_messages(self) -> list[ChatMessage]:
        """The conversation as domain messages; a legacy ``function`` result answers the call before it."""
        messages, legacy_call_id = [], None
        for index, message in enumerate(self.messages):
            if message.function_call is not None:
                legacy_call_id = f"call_{index}"
            messages.append(message.to_domain(index, legacy_call_id))
        return messages

    @property
    def legacy_functions(self) -> bool:
        """The request offers legacy ``functions``, so the answer names its call in ``function_call``."""
        return self.functions is not None

    def tool_use(self) -> ToolUse:
        """The offered tools (names and schemas checked), the tool choice and whether calls may be parallel.

        Legacy ``functions`` and ``function_call`` are tools and a tool choice, with one call at most.
        """
        if self.functions is not None or self.function_call is not None:
            return self._legacy_tool_use()
        tools = tuple(tool.to_domain(index) for index, tool in enumerate(self.tools or ()))
        if self.tool_choice is not None and self.tools is None:
            msg = "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified."
            raise InvalidRequestError(msg, param="tool_choice")
        return ToolUse(tools, tool_choice(self.tool_choice, has_tools=bool(tools)), self.parallel_tool_calls)

    def _legacy_tool_use(self) -> ToolUse:
        if self.tools is not None or self.tool_choice is not None:
            msg = "functions and function_call are the legacy tools and tool_choice: send one pair or the other"
            raise InvalidRequestError(msg, param="functions")
        if self.functions is None:
            msg = "Invalid value for 'function_call': 'function_call' is only allowed when 'functions' are specified."
            raise InvalidRequestError(msg, param="function_call")
        try:
            tools = tuple(tool.to_domain(index) for index, tool in enumerate(legacy_tools(self.functions)))
        except InvalidRequestError as error:  # name the legacy field the client sent
            param = (error.param or "functions").replace("tools[", "functions[").replace("].function.", "].")
            message = error.message.replace("tools[", "functions[").replace("].function.", "].")
            raise InvalidRequestError(message, param=param) from error
        choice = tool_choice(legacy_tool_choice(self.function_call), has_tools=bool(tools))
        return ToolUse(tools, choice, parallel=False)


@attrs.frozen(kw_only=True)
class CompletionRequest(SamplingRequest):
    """Body of ``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = ranged(0, MAX_TOP_LOGPROBS)
    suffix: str | None = attrs.field(default=None, validator=_not_yet)

    def top_logprobs_wanted(self) -> int | None:
        """The legacy ``logprobs: k``: each token's logprob and the ``k`` most likely alternatives."""
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s): one string, several, one list of token ids, or several."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        if all(isinstance(item, int) for item in prompt):
            return [prompt]  # type: ignore[list-item]
        if any(isinstance(item, list) and not item for item in prompt):
            raise InvalidRequestError("a prompt of token ids must not be empty", param="prompt")
        return list(prompt)  # type: ignore[arg-type]
