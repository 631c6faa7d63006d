"""What a caller asks a generator for, and what comes back."""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Mapping

import attrs


class FinishReason(enum.StrEnum):
    """Why generation ended, in OpenAI's words."""

    STOP = "stop"
    """The model produced an end-of-sequence token or a stop sequence."""
    LENGTH = "length"
    """The token budget (``max_tokens`` or the context window) ran out."""


@attrs.frozen(kw_only=True)
class GenerationParams:
    """Decoding parameters of one request: OpenAI's and HuggingFace ``GenerationConfig``'s.

    ``None`` means "not set": the generator's defaults apply. ``extra`` carries any other option
    the request named (the HF adapter passes on those ``GenerationConfig`` knows).
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    typical_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    encoder_no_repeat_ngram_size: int | None = None
    num_beams: int | None = None
    num_beam_groups: int | None = None
    diversity_penalty: float | None = None
    length_penalty: float | None = None
    min_length: int | None = None
    min_new_tokens: int | None = None
    early_stopping: bool | str | None = None
    guidance_scale: float | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    extra: Mapping[str, object] = attrs.field(factory=dict)

    @property
    def greedy(self) -> bool:
        """Temperature 0 means greedy decoding, as in OpenAI's API."""
        return self.temperature == 0

    @property
    def uses_beams(self) -> bool:
        """Beam search keeps several hypotheses, so tokens are only known at the end."""
        return (self.num_beams or 1) > 1


@attrs.frozen
class GeneratedTokens:
    """One step of a generation stream: new token ids, and on the last step why it ended."""

    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None


@attrs.frozen
class Usage:
    """Token counts of one request, as OpenAI reports them."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt and completion together."""
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen
class TextDelta:
    """A piece of clean text produced by a use case while it streams."""

    text: str


@attrs.frozen
class Completion:
    """The finished result of a chat or text completion."""

    text: str
    finish_reason: FinishReason
    usage: Usage


CompletionStream = AsyncGenerator[TextDelta | Completion, None]
"""What the use cases stream: text deltas, then exactly one ``Completion``."""
