"""The OpenAI wire format: request and response bodies, structured with one private cattrs converter."""

from __future__ import annotations

import enum
import math
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import attrs
import cattrs
import cattrs.gen
from attrs import validators as v
from cattrs.cols import list_structure_factory

from domain.errors import InvalidRequestError
from domain.generation import Choice, FinishReason, GenerationParams, LogprobEntry
from domain.messages import ChatMessage, Role
from domain.tools import ToolUse
from entrypoints.http.peers import ConstraintFields
from entrypoints.http.wire_tools import (
    FunctionCallBody,
    FunctionCallingMessage,
    FunctionDefinition,
    LegacyFunctionCallBody,
    ToolCallBody,
    ToolCallDeltaBody,
    ToolCallingMessage,
    ToolChoiceBody,
    ToolDefinition,
    function_call_body,
    legacy_tool_choice,
    legacy_tools,
    tool_call_bodies,
    tool_choice,
)

T = TypeVar("T")


def _finite(_instance: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not isinstance(value, int) and not math.isfinite(value):
        msg = f"'{attribute.name}' must be a finite number"
        raise ValueError(msg, attribute, value)


def _not_yet(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    """Accept the OpenAI default (what SDKs and LangChain send), refuse what this server cannot honour yet."""
    if value:
        msg = f"'{attribute.name}' is not supported yet; leave it unset or zero"
        raise ValueError(msg)


MAX_CHOICES = 64
MAX_TOP_LOGPROBS = 20
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
"""OpenAI's ``seed`` is a signed 64-bit integer."""


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
    """A number field checked against ``[low, high]`` (finite), with the same bounds in the published schema."""
    checks: list[Any] = [_finite]
    if low is not None:
        checks.append(v.ge(low))
    if high is not None:
        checks.append(v.le(high))
    limits = {name: bound for name, bound in (("minimum", low), ("maximum", high)) if bound is not None}
    return attrs.field(default=default, validator=v.optional(checks), metadata={"schema": limits})


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

    model: str | None = None
    max_tokens: int | None = ranged(0)
    max_completion_tokens: int | None = ranged(0)
    temperature: float | None = ranged(0, 2)
    top_p: float | None = ranged(0, 1)
    n: int = ranged(1, MAX_CHOICES, default=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = ranged(MIN_SEED, MAX_SEED)
    presence_penalty: float | None = ranged(-2, 2)
    frequency_penalty: float | None = ranged(-2, 2)
    logit_bias: dict[str, float] | None = attrs.field(default=None, validator=v.optional(_token_biases))
    user: str | None = None
    # HuggingFace generation options, sent by the OpenAI SDK through ``extra_body``.
    max_new_tokens: int | None = ranged(0)
    top_k: int | None = ranged(0)
    typical_p: float | None = ranged(0, 1)
    min_p: float | None = ranged(0, 1)
    repetition_penalty: float | None = attrs.field(default=None, validator=v.optional([_finite, v.gt(0)]))
    no_repeat_ngram_size: int | None = ranged(0)
    encoder_no_repeat_ngram_size: int | None = ranged(0)
    num_beams: int | None = ranged(1)
    num_beam_groups: int | None = ranged(1)
    diversity_penalty: float | None = attrs.field(default=None, validator=v.optional([_finite, v.ge(0)]))
    length_penalty: float | None = attrs.field(default=None, validator=v.optional(_finite))
    min_length: int | None = ranged(0)
    min_new_tokens: int | None = ranged(0)
    early_stopping: bool | Literal["never"] | None = None
    guidance_scale: float | None = attrs.field(default=None, validator=v.optional([_finite, v.ge(0)]))
    bad_words_ids: list[list[int]] | None = None
    do_sample: bool | None = None
    # vLLM's and llama.cpp's sampling extras.
    min_tokens: int | None = ranged(0)
    ignore_eos: bool = False
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
        if self.bad_words_ids is not None and any(not ids for ids in self.bad_words_ids):
            raise InvalidRequestError(
                "bad_words_ids must be a list of non-empty lists of token ids", param="bad_words_ids"
            )

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

    def to_params(self, extra: dict[str, Any]) -> GenerationParams:
        """The domain's generation parameters; ``extra`` holds the request's unknown fields."""
        predicted = None if self.n_predict is None or self.n_predict < 0 else self.n_predict
        max_new_tokens = next(
            (n for n in (self.max_completion_tokens, self.max_tokens, self.max_new_tokens, predicted) if n is not None),
            None,
        )
        options = {} if self.do_sample is None else {"do_sample": self.do_sample}
        return GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            typical_p=self.typical_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            encoder_no_repeat_ngram_size=self.encoder_no_repeat_ngram_size,
            num_beams=self.num_beams,
            num_beam_groups=self.num_beam_groups,
            diversity_penalty=self.diversity_penalty,
            length_penalty=self.length_penalty,
            min_length=self.min_length,
            min_new_tokens=self.min_new_tokens if self.min_new_tokens is not None else self.min_tokens,
            early_stopping=self.early_stopping,
            guidance_scale=self.guidance_scale,
            bad_words_ids=None if self.bad_words_ids is None else tuple(tuple(ids) for ids in self.bad_words_ids),
            seed=self.seed,
            stop=self.stop_sequences(),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias={int(token): bias for token, bias in (self.logit_bias or {}).items()},
            logprobs=self.top_logprobs_wanted(),
            prompt_logprobs=self.prompt_logprobs,
            constraint=self.output_constraint(),
            ignore_eos=self.ignore_eos,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            allowed_token_ids=None if self.allowed_token_ids is None else tuple(self.allowed_token_ids),
            extra=options | extra,
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


# Responses -------------------------------------------------------------------------------------------------------


@attrs.frozen
class PromptTokensDetails:
    """``usage.prompt_tokens_details``."""

    cached_tokens: int = 0


@attrs.frozen
class CompletionTokensDetails:
    """``usage.completion_tokens_details``."""

    reasoning_tokens: int = 0


@attrs.frozen
class UsageBody:
    """``usage``."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = attrs.field(factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = attrs.field(factory=CompletionTokensDetails)


@attrs.frozen
class AssistantMessage:
    """The answer's ``message``."""

    content: str
    role: str = "assistant"


@attrs.frozen
class ReasonedMessage:
    """The answer's ``message`` when the model thought first: the thinking as ``reasoning_content`` and ``reasoning``.

    ``reasoning_content`` is vLLM's and DeepSeek's name, ``reasoning`` the newer one; both carry the same text.
    """

    content: str | None
    reasoning_content: str
    reasoning: str
    tool_calls: list[ToolCallBody] | None = None
    role: str = "assistant"


def assistant_message(
    choice: Choice, *, legacy_functions: bool = False
) -> AssistantMessage | ToolCallingMessage | ReasonedMessage | FunctionCallingMessage:
    """The ``message`` of a finished chat choice: its text, or the tools it called (and any text, else ``null``).

    To a legacy ``functions`` request, the call is ``function_call``.
    """
    if choice.reasoning and not legacy_functions:
        calls = tool_call_bodies(choice.tool_calls) if choice.tool_calls else None
        return ReasonedMessage(choice.text or None, choice.reasoning, choice.reasoning, calls)
    if not choice.tool_calls:
        return AssistantMessage(choice.text)
    if legacy_functions:
        return FunctionCallingMessage(choice.text or None, function_call_body(choice.tool_calls[0]))
    return ToolCallingMessage(choice.text or None, tool_call_bodies(choice.tool_calls))


def finish_reason(choice: Choice, *, legacy_functions: bool = False) -> str:
    """OpenAI's ``finish_reason``; a legacy ``functions`` request that called one finishes with ``function_call``."""
    if legacy_functions and choice.finish_reason is FinishReason.TOOL_CALLS:
        return "function_call"
    return str(choice.finish_reason)


@attrs.frozen
class TopLogprob:
    """An alternative token at a position, in chat ``logprobs``."""

    token: str
    logprob: float
    bytes: list[int]


@attrs.frozen
class TokenLogprobBody:
    """A generated token in chat ``logprobs.content``."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


@attrs.frozen
class ChatLogprobs:
    """Chat ``logprobs``: one entry per generated token."""

    content: list[TokenLogprobBody]
    refusal: None = None


@attrs.frozen
class CompletionLogprobs:
    """The legacy completions ``logprobs`` object."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


LOWEST_LOGPROB = -9999.0
"""JSON has no infinity: a token that could not be chosen reports this, as vLLM does."""


def _finite_logprob(value: float) -> float:
    return max(value, LOWEST_LOGPROB) if not math.isnan(value) else LOWEST_LOGPROB


def as_token_ids(entries: Sequence[LogprobEntry]) -> tuple[LogprobEntry, ...]:
    """``entries`` with every token written ``token_id:<id>`` (vLLM's ``return_tokens_as_token_ids``)."""
    return tuple(
        attrs.evolve(
            entry,
            token=f"token_id:{entry.token_id}" if entry.token_id is not None else entry.token,
            top=tuple((f"token_id:{i}", value) for i, (_, value) in zip(entry.top_ids, entry.top, strict=False)),
        )
        for entry in entries
    )


def chat_logprobs(entries: Sequence[LogprobEntry], *, token_ids: bool = False) -> ChatLogprobs:
    """Chat ``logprobs`` for the tokens behind some text (tokens named by id with ``token_ids``)."""
    entries = as_token_ids(entries) if token_ids else entries
    return ChatLogprobs(
        [
            TokenLogprobBody(
                entry.token,
                _finite_logprob(entry.logprob if entry.logprob is not None else 0.0),
                list(entry.token.encode()),
                [TopLogprob(token, _finite_logprob(value), list(token.encode())) for token, value in entry.top],
            )
            for entry in entries
        ]
    )


def completion_logprobs(entries: Sequence[LogprobEntry], *, token_ids: bool = False) -> CompletionLogprobs:
    """Legacy completions ``logprobs`` for the tokens behind some text; an echoed prompt's first token has none."""
    entries = as_token_ids(entries) if token_ids else entries
    return CompletionLogprobs(
        tokens=[entry.token for entry in entries],
        token_logprobs=[None if e.logprob is None else _finite_logprob(e.logprob) for e in entries],
        top_logprobs=[None if e.logprob is None else _top_with_chosen(e) for e in entries],
        text_offset=[entry.offset for entry in entries],
    )


def _top_with_chosen(entry: LogprobEntry) -> dict[str, float]:
    """A legacy ``top_logprobs`` entry: the ``k`` alternatives and the chosen token (up to ``k + 1``, as OpenAI)."""
    top = {token: _finite_logprob(value) for token, value in entry.top}
    top.setdefault(entry.token, _finite_logprob(entry.logprob if entry.logprob is not None else 0.0))
    return top


@attrs.frozen
class PromptLogprob:
    """One token of a position in vLLM's ``prompt_logprobs``."""

    logprob: float
    rank: int | None
    decoded_token: str


PromptLogprobs = list[dict[str, PromptLogprob] | None]
"""vLLM's ``prompt_logprobs``: per prompt token, the token and its alternatives by id (the first token: ``null``)."""


def prompt_logprobs_body(entries: Sequence[LogprobEntry] | None) -> PromptLogprobs | None:
    """VLLM's ``prompt_logprobs`` for a prompt's scored tokens."""
    if entries is None:
        return None
    body: PromptLogprobs = []
    for entry in entries:
        if entry.logprob is None or entry.token_id is None:
            body.append(None)
            continue
        position = {str(entry.token_id): PromptLogprob(_finite_logprob(entry.logprob), entry.rank, entry.token)}
        for rank, (token_id, (token, value)) in enumerate(zip(entry.top_ids, entry.top, strict=False), start=1):
            position.setdefault(str(token_id), PromptLogprob(_finite_logprob(value), rank, token))
        body.append(position)
    return body


@attrs.frozen
class ChatChoice:
    """One of ``choices`` in a chat completion."""

    index: int
    message: AssistantMessage | ToolCallingMessage | ReasonedMessage | FunctionCallingMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


@attrs.frozen
class ChatCompletionResponse:
    """Body of a chat completion (``object: chat.completion``)."""

    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageBody
    object: str = "chat.completion"
    system_fingerprint: str | None = None


@attrs.frozen
class Delta:
    """What a chat chunk adds: the role on the first chunk, then content, or tool calls as each completes."""

    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDeltaBody] | None = None
    function_call: FunctionCallBody | None = None
    """To a legacy ``functions`` request: the call, whole."""
    reasoning_content: str | None = None
    reasoning: str | None = None


@attrs.frozen
class ChunkChoice:
    """One of ``choices`` in a chat chunk."""

    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


@attrs.frozen
class ChatCompletionChunk:
    """One streamed event (``object: chat.completion.chunk``)."""

    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageBody | None = None
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None


@attrs.frozen
class CompletionChoice:
    """One of ``choices`` in a text completion (also its streamed chunks)."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


@attrs.frozen
class CompletionResponse:
    """Body of a text completion, and of each of its streamed chunks (``object: text_completion``)."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageBody | None = None
    object: str = "text_completion"
    system_fingerprint: str | None = None


@attrs.frozen
class ScoredCompletionChoice(CompletionChoice):
    """A completion choice with vLLM's ``prompt_logprobs`` (only when asked for: OpenAI's shape stays as it is)."""

    prompt_logprobs: PromptLogprobs | None = None


@attrs.frozen
class ScoredChatCompletionResponse(ChatCompletionResponse):
    """A chat completion with vLLM's ``prompt_logprobs``, when asked for."""

    prompt_logprobs: PromptLogprobs | None = None


@attrs.frozen
class ScoredChatCompletionChunk(ChatCompletionChunk):
    """The chunk that ends a streamed chat choice, with vLLM's ``prompt_logprobs`` when asked for."""

    prompt_logprobs: PromptLogprobs | None = None


def completion_choice(
    index: int,
    text: str,
    finish_reason: str | None,
    logprobs: CompletionLogprobs | None = None,
    *,
    prompt_logprobs: Sequence[LogprobEntry] | None = None,
) -> CompletionChoice:
    """A completion choice, carrying ``prompt_logprobs`` when they were asked for."""
    if prompt_logprobs is None:
        return CompletionChoice(index, text, finish_reason, logprobs)
    return ScoredCompletionChoice(index, text, finish_reason, logprobs, prompt_logprobs_body(prompt_logprobs))


@attrs.frozen
class ModelCard:
    """One entry of ``GET /v1/models``."""

    id: str
    created: int
    owned_by: str = "hf-openai-server"
    object: str = "model"


@attrs.frozen
class ModelList:
    """Body of ``GET /v1/models``."""

    data: list[ModelCard]
    object: str = "list"


@attrs.frozen
class ErrorInfo:
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


@attrs.frozen
class ErrorBody:
    """Every error response: ``{"error": {...}}``."""

    error: ErrorInfo


# Structuring -----------------------------------------------------------------------------------------------------


def _strict(kind: type[Any], *, accepts: tuple[type[Any], ...]) -> Any:  # noqa: ANN401  a cattrs hook
    def structure(value: object, _: object) -> object:
        if isinstance(value, bool) and kind is not bool:
            msg = f"expected {kind.__name__}, got a boolean"
            raise TypeError(msg)
        if not isinstance(value, accepts):
            msg = f"expected {kind.__name__}, got {type(value).__name__}"
            raise TypeError(msg)
        if kind is float:
            return float(value)
        return value

    return structure


def _union(converter: cattrs.Converter) -> Any:  # noqa: ANN401  a cattrs hook
    def structure(value: object, union: Any) -> object:  # noqa: ANN401
        arms = typing.get_args(union)
        if value is None and type(None) in arms:
            return None
        fitting = [arm for arm in arms if _takes_object(arm, value)]
        if len(fitting) == 1:  # the only arm for a JSON object: its own error says what is wrong inside
            return converter.structure(value, fitting[0])
        for arm in arms:
            if arm is type(None):
                continue
            try:
                return converter.structure(value, arm)
            except (TypeError, ValueError, cattrs.BaseValidationError):
                continue
        names = " or ".join("null" if arm is type(None) else _type_name(arm) for arm in arms)
        msg = f"expected {names}, got {type(value).__name__}"
        raise TypeError(msg)

    return structure


def _takes_object(kind: Any, value: object) -> bool:  # noqa: ANN401
    """Whether ``value`` is a JSON object and ``kind`` one (an attrs class or a dict)."""
    return isinstance(value, dict) and (attrs.has(kind) or typing.get_origin(kind) is dict)


def _type_name(kind: Any) -> str:  # noqa: ANN401
    origin = typing.get_origin(kind)
    if origin is list:
        return f"array of {_type_name(typing.get_args(kind)[0])}"
    if origin is typing.Literal:
        return " or ".join(repr(arg) for arg in typing.get_args(kind))
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(kind, "object")


def _list_factory(kind: Any, converter: cattrs.Converter) -> Any:  # noqa: ANN401  a cattrs hook factory
    items = list_structure_factory(kind, converter)

    def structure(value: object, kind: Any) -> object:  # noqa: ANN401
        if not isinstance(value, list):
            msg = f"expected an array, got {type(value).__name__}"
            raise TypeError(msg)
        return items(value, kind)

    return structure


def _object_factory(kind: Any, converter: cattrs.Converter) -> Any:  # noqa: ANN401  a cattrs hook factory
    key_type, value_type = typing.get_args(kind)

    def structure(value: object, _: Any) -> object:  # noqa: ANN401
        if not isinstance(value, dict):
            msg = f"expected an object, got {type(value).__name__}"
            raise TypeError(msg)
        return {converter.structure(k, key_type): converter.structure(x, value_type) for k, x in value.items()}

    return structure


def _enum(value: object, kind: type[enum.Enum]) -> enum.Enum:
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(repr(member.value) for member in kind)
        msg = f"must be one of {allowed}, got {value!r}"
        raise ValueError(msg) from None


def _is_list(kind: Any) -> bool:  # noqa: ANN401
    return typing.get_origin(kind) is list


def _is_dict(kind: Any) -> bool:  # noqa: ANN401
    return typing.get_origin(kind) is dict


def _is_union(kind: Any) -> bool:  # noqa: ANN401
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def _is_literal(kind: Any) -> bool:  # noqa: ANN401
    return typing.get_origin(kind) is typing.Literal


def _literal(value: object, kind: Any) -> object:  # noqa: ANN401  a cattrs hook
    """One of the literal's values, else a readable ``ValueError`` (which union structuring moves past)."""
    allowed = typing.get_args(kind)
    if isinstance(value, str | int | bool | None) and any(type(value) is type(a) and value == a for a in allowed):
        return value
    msg = f"must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}"
    raise ValueError(msg)


def _nulls_mean_default(kind: Any, converter: cattrs.Converter) -> Any:  # noqa: ANN401  a cattrs hook factory
    """Structure an attrs class, reading an explicit ``null`` as "unset" for fields with a default (as OpenAI does)."""
    structure_fields = cattrs.gen.make_dict_structure_fn(kind, converter)
    hints = typing.get_type_hints(kind)
    defaulted = {
        field.name
        for field in attrs.fields(kind)
        if field.default is not attrs.NOTHING and type(None) not in typing.get_args(hints[field.name])
    }

    def structure(value: Any, _: Any) -> object:  # noqa: ANN401
        if isinstance(value, dict) and defaulted:
            value = {key: item for key, item in value.items() if item is not None or key not in defaulted}
        return structure_fields(value, kind)

    return structure


def _converter() -> cattrs.Converter:
    """The wire converter: strict JSON types (no "1" for 1, no 1 for true), enums by value, null as default."""
    converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=False)
    converter.register_structure_hook_factory(attrs.has, _nulls_mean_default)
    converter.register_structure_hook_func(_is_union, _union(converter))
    converter.register_structure_hook_factory(_is_list, _list_factory)
    converter.register_structure_hook_factory(_is_dict, _object_factory)
    converter.register_structure_hook(Role, _enum)
    converter.register_unstructure_hook(
        Delta, cattrs.gen.make_dict_unstructure_fn(Delta, converter, _cattrs_omit_if_default=True)
    )
    plain_choice = cattrs.gen.make_dict_unstructure_fn(CompletionChoice, converter)
    scored_choice = cattrs.gen.make_dict_unstructure_fn(ScoredCompletionChoice, converter)
    converter.register_unstructure_hook(
        CompletionChoice, lambda c: scored_choice(c) if isinstance(c, ScoredCompletionChoice) else plain_choice(c)
    )
    converter.register_structure_hook_func(_is_literal, _literal)
    converter.register_structure_hook(int, _strict(int, accepts=(int,)))
    converter.register_structure_hook(float, _strict(float, accepts=(int, float)))
    converter.register_structure_hook(str, _strict(str, accepts=(str,)))
    converter.register_structure_hook(bool, _strict(bool, accepts=(bool,)))
    return converter


_CONVERTER = _converter()


def unstructure(value: object) -> Any:  # noqa: ANN401  JSON-ready data
    """A response object as JSON-ready data."""
    return _CONVERTER.unstructure(value)


def structure(body: object, kind: type[T]) -> tuple[T, dict[str, Any]]:
    """Structure a decoded JSON body into ``kind``; also return the fields ``kind`` does not know.

    Any failure becomes an ``InvalidRequestError`` naming the offending field, e.g. ``$.messages[0].role``.
    """
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    try:
        request = _CONVERTER.structure(body, kind)
    except InvalidRequestError:
        raise
    except Exception as error:
        message, param = _describe(error)
        raise InvalidRequestError(message, param=param) from error
    known = {field.name for field in attrs.fields(kind)}  # type: ignore[arg-type]
    return request, {key: value for key, value in body.items() if key not in known}


_VALIDATOR_MESSAGE = re.compile(r"^(?:Length of )?'(?P<name>\w+)'")
"""attrs validators name the field first: "'temperature' must be <= 2: 3"."""


def _describe(error: BaseException) -> tuple[str, str | None]:
    """One readable message and the field it concerns, from a cattrs or attrs validation failure."""
    found = _first_leaf(error, "$")
    if found is None:
        return str(error), None
    path, leaf = found
    if isinstance(leaf, InvalidRequestError):
        return leaf.message, leaf.param
    if isinstance(leaf, ValueError) and (named := _VALIDATOR_MESSAGE.match(str(leaf.args[0]) if leaf.args else "")):
        path = f"{path}.{named['name']}"
        detail = str(leaf.args[0])
    elif isinstance(leaf, KeyError):
        detail = "required field missing"
    else:
        detail = str(leaf) or type(leaf).__name__
    param = path.removeprefix("$").lstrip(".") or None
    return f"{path}: {detail}", param


def _first_leaf(error: BaseException, path: str) -> tuple[str, BaseException] | None:
    """The first non-group exception inside ``error``, with the JSON path cattrs recorded for it."""
    if not isinstance(error, BaseExceptionGroup):
        return path, error
    for sub in error.exceptions:
        step = ""
        for note in getattr(sub, "__notes__", []):
            name = getattr(note, "name", None)
            index = getattr(note, "index", None)
            if name is not None:
                step = f".{name}"
            elif index is not None:
                step = f"[{index}]"
        found = _first_leaf(sub, path + step)
        if found is not None:
            return found
    return None
