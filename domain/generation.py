"""What a caller asks a generator for, and what comes back."""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Mapping

import attrs

from domain.tools import ToolCall


class FinishReason(enum.StrEnum):
    """Why generation ended, in OpenAI's words."""

    STOP = "stop"
    """The model produced an end-of-sequence token or a stop sequence."""
    LENGTH = "length"
    """The token budget (``max_tokens`` or the context window) ran out."""
    TOOL_CALLS = "tool_calls"
    """The model called tools and ended its turn."""


@attrs.frozen
class OutputConstraint:
    """A grammar the generated text must follow: JSON matching ``json_schema`` (any JSON object when ``None``).

    With ``wrapper`` (an opening and a closing text), the output is instead such JSON values each written between
    the two, one of them or, with ``repeat``, one or more separated by newlines: how tool calls are written.
    Instead of JSON, the output may have to match ``regex``, be one of ``choices``, or follow ``grammar`` (Lark, or
    llama.cpp's GBNF). With ``alternative``, the output may follow that constraint instead (an answer beside calls).
    """

    json_schema: Mapping[str, object] | None = None
    wrapper: tuple[str, str] | None = None
    repeat: bool = False
    param: str = "response_format"
    """The request field the constraint comes from, named in the error when it cannot be enforced."""
    regex: str | None = None
    choices: tuple[str, ...] | None = None
    grammar: str | None = None
    alternative: OutputConstraint | None = None

    @property
    def is_json(self) -> bool:
        """The output is JSON (possibly wrapped), not a regex, a choice or a grammar."""
        return self.regex is None and self.choices is None and self.grammar is None


@attrs.frozen(kw_only=True)
class GenerationParams:
    """Decoding parameters of one request: OpenAI's, and the table's (``domain.options``) in ``options``.

    ``None`` means "not set": the generator's defaults apply.
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token already generated."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it was generated."""
    logit_bias: Mapping[int, float] = attrs.field(factory=dict)
    """Added to the logits of these token ids at every step."""
    logprobs: int | None = None
    """Return each generated token's log-probability and this many most likely alternatives (``None``: none)."""
    prompt_logprobs: int | None = None
    """Return each prompt token's log-probability and this many alternatives (vLLM's; ``None``: none)."""
    constraint: OutputConstraint | None = None
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end generation like end-of-sequence (vLLM's)."""
    allowed_token_ids: tuple[int, ...] | None = None
    """Only these token ids may be generated (vLLM's); ``None``: any."""
    adapter: str | None = None
    """The LoRA adapter the model runs with (``None``: the base model); set from the request's model name."""
    options: Mapping[str, object] = attrs.field(factory=dict)
    """The table's options (``domain.options``) the request set, checked, under their own names: ``top_k``..."""
    extra: Mapping[str, object] = attrs.field(factory=dict)
    """The request's other fields; the generator passes on those its library knows and ignores the rest."""

    @property
    def uses_beams(self) -> bool:
        """Beam search keeps several hypotheses, so tokens are only known at the end."""
        beams = self.options.get("num_beams", 1)
        return isinstance(beams, int) and beams > 1


@attrs.frozen
class TokenLogprob:
    """A token's log-probability, with the most likely alternatives at its position when they were asked for."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None
    """The token's place among all at its position, 1 for the most likely (``None``: not known)."""


@attrs.frozen
class GeneratedTokens:
    """One step of a generation stream: new token ids (with log-probabilities when asked), or why it ended."""

    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    cached_tokens: int = 0
    """On a stream's first step: how many prompt tokens were read from a prefix cache instead of computed."""


@attrs.frozen
class Usage:
    """Token counts of one request, as OpenAI reports them."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens read from a prefix cache (OpenAI's ``prompt_tokens_details.cached_tokens``)."""
    reasoning_tokens: int = 0
    """Completion tokens the model spent thinking (OpenAI's ``completion_tokens_details.reasoning_tokens``)."""

    @property
    def total_tokens(self) -> int:
        """Prompt and completion together."""
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen
class LogprobEntry:
    """A token of a choice's text as clients see it: its text, log-probability and place in the choice's text."""

    token: str
    logprob: float | None
    """``None`` for the first token of an echoed prompt, which has nothing to be predicted from."""
    offset: int
    """Where the token's text starts in the choice's text."""
    top: tuple[tuple[str, float], ...] = ()
    token_id: int | None = None
    top_ids: tuple[int, ...] = ()
    """The ids of the ``top`` alternatives, in the same order."""
    rank: int | None = None


@attrs.frozen
class TextDelta:
    """A piece of clean text of one choice, produced while the use case streams, with its tokens' logprobs.

    ``tool_calls`` holds the calls completed since the previous delta (chat with tools); their markup is not text.
    ``reasoning`` holds thinking the model wrote since the previous delta (``<think>...</think>``); it is not text.
    """

    text: str
    index: int = 0
    logprobs: tuple[LogprobEntry, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    prompt_tokens: int = 0
    """How many tokens the choice's prompt holds."""
    completion_tokens: int = 0
    """How many tokens the choice has generated so far (for usage on every chunk, vLLM's continuous usage)."""
    reasoning: str = ""


@attrs.frozen
class Choice:
    """One finished choice: all of its text, why it ended, and its tokens' logprobs when they were asked for."""

    text: str
    finish_reason: FinishReason
    index: int = 0
    logprobs: tuple[LogprobEntry, ...] | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    """Prompt tokens its generation read from a prefix cache."""
    tool_calls: tuple[ToolCall, ...] = ()
    """The tools the model called (chat with tools); ``text`` then holds only the rest of its answer."""
    prompt_logprobs: tuple[LogprobEntry, ...] | None = None
    """Its prompt's tokens' logprobs when they were asked for (the first token's is ``None``)."""
    stop_sequence: str | None = None
    """The stop sequence that ended the text, when one did (it is not part of ``text``)."""
    reasoning: str = ""
    """What the model thought before answering (chat with a thinking model); never part of ``text``."""


@attrs.frozen
class Completion:
    """The finished result of a request: every choice, by index, and the request's usage."""

    choices: tuple[Choice, ...]
    usage: Usage

    @property
    def text(self) -> str:
        """The first choice's text (most requests have one)."""
        return self.choices[0].text

    @property
    def finish_reason(self) -> FinishReason:
        """The first choice's finish reason."""
        return self.choices[0].finish_reason


CompletionEvent = TextDelta | Choice | Completion
CompletionStream = AsyncGenerator[CompletionEvent, None]
"""What the use cases stream: text deltas and finished choices as they come, then exactly one ``Completion``."""
