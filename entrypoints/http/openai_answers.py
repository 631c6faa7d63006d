"""OpenAI's answers built from a use case's events: whole (``chat.completion``, ``text_completion``) or as chunks.

One ``AnswerShape``, read off the request once, tells both forms what to include, so the whole answer and the
streamed one are built by the same rules.
"""

from __future__ import annotations

import time

import attrs

from domain.generation import Choice, Completion, TextDelta, Usage
from entrypoints.http.openai_bodies import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChunkChoice,
    CompletionChoice,
    CompletionResponse,
    CompletionTokensDetails,
    Delta,
    PromptTokensDetails,
    ScoredChatCompletionChunk,
    ScoredChatCompletionResponse,
    UsageBody,
    assistant_message,
    chat_logprobs,
    completion_choice,
    completion_logprobs,
    finish_reason,
    prompt_logprobs_body,
)
from entrypoints.http.openai_requests import ChatCompletionRequest, SamplingRequest
from entrypoints.http.streaming import ChunkFactory
from entrypoints.http.wire_tools import function_call_body, tool_call_deltas


@attrs.frozen(kw_only=True)
class AnswerShape:
    """What an OpenAI answer carries besides the generated text: its id, time and model, and the request's switches.

    ``logprobs``: each token's logprobs; ``token_ids``: logprobs name tokens ``token_id:<id>`` (vLLM's);
    ``legacy_functions``: a call is ``function_call`` (the request offered legacy ``functions``);
    ``continuous_usage``: every chunk carries its choice's usage so far (vLLM's).
    """

    response_id: str
    model: str
    created: int = attrs.field(factory=lambda: int(time.time()))
    logprobs: bool = False
    token_ids: bool = False
    legacy_functions: bool = False
    continuous_usage: bool = False

    @classmethod
    def of(cls, body: SamplingRequest, response_id: str, model: str) -> AnswerShape:
        """The shape a chat or text completion request asks for."""
        return cls(
            response_id=response_id,
            model=model,
            logprobs=body.top_logprobs_wanted() is not None,
            token_ids=body.return_tokens_as_token_ids,
            legacy_functions=isinstance(body, ChatCompletionRequest) and body.legacy_functions,
            continuous_usage=body.continuous_usage,
        )


def chat_completion(result: Completion, shape: AnswerShape) -> ChatCompletionResponse:
    """The whole ``chat.completion``: each choice's message, finish reason and logprobs; usage; prompt logprobs."""
    legacy = shape.legacy_functions
    choices = [
        ChatChoice(
            c.index,
            assistant_message(c, legacy_functions=legacy),
            finish_reason(c, legacy_functions=legacy),
            None if c.logprobs is None else chat_logprobs(c.logprobs, token_ids=shape.token_ids),
        )
        for c in result.choices
    ]
    head = (shape.response_id, shape.created, shape.model, choices, usage_body(result.usage))
    scored = result.choices[0].prompt_logprobs
    if scored is not None:
        return ScoredChatCompletionResponse(*head, prompt_logprobs=prompt_logprobs_body(scored))
    return ChatCompletionResponse(*head)


def text_completion(result: Completion, shape: AnswerShape) -> CompletionResponse:
    """The whole ``text_completion``: each choice's text, finish reason, logprobs and prompt logprobs; usage."""
    choices = [
        completion_choice(
            c.index,
            c.text,
            str(c.finish_reason),
            None if c.logprobs is None else completion_logprobs(c.logprobs, token_ids=shape.token_ids),
            prompt_logprobs=c.prompt_logprobs,
        )
        for c in result.choices
    ]
    return CompletionResponse(shape.response_id, shape.created, shape.model, choices, usage_body(result.usage))


def usage_body(usage: Usage) -> UsageBody:
    """The wire form of ``usage``."""
    return UsageBody(
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        PromptTokensDetails(usage.cached_tokens),
        CompletionTokensDetails(usage.reasoning_tokens),
    )


def chat_chunks(shape: AnswerShape) -> ChunkFactory:
    """Chunk factory for ``chat.completion.chunk``; each choice's first chunk carries the assistant role.

    Tool calls are sent whole as they complete, numbered within their choice; to a legacy ``functions`` request,
    the call is ``delta.function_call``. With ``continuous_usage`` every chunk carries its choice's usage so far.
    """
    response_id, created, model = shape.response_id, shape.created, shape.model
    legacy_functions = shape.legacy_functions
    started: set[int] = set()
    called: dict[int, int] = {}
    usage_so_far = _UsageSoFar(enabled=shape.continuous_usage)

    def chunk(item: TextDelta | Choice | Completion) -> object:
        if isinstance(item, Completion):
            return ChatCompletionChunk(response_id, created, model, [], usage_body(item.usage))
        first = item.index not in started
        started.add(item.index)
        role = "assistant" if first else None
        if isinstance(item, Choice):
            reason = finish_reason(item, legacy_functions=legacy_functions)
            choice = ChunkChoice(item.index, Delta(role=role, content="" if first else None), reason)
            if item.prompt_logprobs is None:
                return ChatCompletionChunk(response_id, created, model, [choice], usage_so_far(item))
            scored = prompt_logprobs_body(item.prompt_logprobs)
            return ScoredChatCompletionChunk(
                response_id, created, model, [choice], usage_so_far(item), prompt_logprobs=scored
            )
        entries = chat_logprobs(item.logprobs, token_ids=shape.token_ids) if shape.logprobs else None
        calls = tool_call_deltas(item.tool_calls, called.get(item.index, 0)) if item.tool_calls else None
        called[item.index] = called.get(item.index, 0) + len(item.tool_calls)
        content = item.text if item.text or not (calls or item.reasoning) else None
        thought = item.reasoning or None
        delta = Delta(role=role, content=content, tool_calls=calls, reasoning_content=thought, reasoning=thought)
        if legacy_functions and item.tool_calls:
            call = function_call_body(item.tool_calls[0])
            delta = attrs.evolve(delta, content=item.text or None, tool_calls=None, function_call=call)
        choice = ChunkChoice(item.index, delta, None, entries)
        return ChatCompletionChunk(response_id, created, model, [choice], usage_so_far(item))

    return chunk


def completion_chunks(shape: AnswerShape) -> ChunkFactory:
    """Chunk factory for streamed ``text_completion`` objects (switches as for ``chat_chunks``)."""
    response_id, created, model = shape.response_id, shape.created, shape.model
    usage_so_far = _UsageSoFar(enabled=shape.continuous_usage)

    def chunk(item: TextDelta | Choice | Completion) -> object:
        if isinstance(item, Completion):
            return CompletionResponse(response_id, created, model, [], usage_body(item.usage))
        if isinstance(item, Choice):
            choice = completion_choice(item.index, "", str(item.finish_reason), prompt_logprobs=item.prompt_logprobs)
        else:
            entries = completion_logprobs(item.logprobs, token_ids=shape.token_ids) if shape.logprobs else None
            choice = CompletionChoice(item.index, item.text, None, entries)
        return CompletionResponse(response_id, created, model, [choice], usage_so_far(item))

    return chunk


@attrs.define
class _UsageSoFar:
    """vLLM's continuous usage: a choice's prompt tokens and the tokens it has generated, on each of its chunks."""

    enabled: bool
    prompts: dict[int, int] = attrs.Factory(dict)

    def __call__(self, item: TextDelta | Choice) -> UsageBody | None:
        if not self.enabled:
            return None
        if isinstance(item, TextDelta) and item.prompt_tokens:
            self.prompts[item.index] = item.prompt_tokens
        prompt = self.prompts.get(item.index)
        if prompt is None:
            return None
        return UsageBody(prompt, item.completion_tokens, prompt + item.completion_tokens)
