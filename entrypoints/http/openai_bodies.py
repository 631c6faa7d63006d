"""OpenAI's response bodies (chat and text completions, models, errors), and their making from domain results."""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs

from domain.generation import Choice, FinishReason, LogprobEntry
from entrypoints.http.wire_tools import (
    FunctionCallBody,
    FunctionCallingMessage,
    ToolCallBody,
    ToolCallDeltaBody,
    ToolCallingMessage,
    function_call_body,
    tool_call_bodies,
)

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
    status: str = "loaded"
    """``loaded``, ``loading``, ``unloaded`` (loads on its first request) or ``failed``."""
    loaded: bool = True
    parent: str | None = None
    """For a LoRA adapter, its base model (as vLLM reports it)."""


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
