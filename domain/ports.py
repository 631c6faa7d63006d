"""The ports the use cases need; adapters implement them, fakes stand in for them in tests."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Protocol

from domain.generation import GeneratedTokens, GenerationParams, OutputConstraint, TokenLogprob
from domain.messages import ChatMessage
from domain.tools import FunctionTool


class Generator(Protocol):
    """A language model with its tokenizer."""

    @property
    def model_id(self) -> str:
        """The name clients use for the model."""
        ...

    @property
    def context_length(self) -> int:
        """How many tokens (prompt and completion) fit in one sequence."""
        ...

    @property
    def vocab_size(self) -> int:
        """How many token ids the model knows: valid ids are ``0 <= id < vocab_size``."""
        ...

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``."""
        ...

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool) -> str:
        """Text of ``token_ids``."""
        ...

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """The tokenizer's own string for each token (``convert_ids_to_tokens``: byte-level pieces, not text)."""
        ...

    def generate(self, prompt_ids: Sequence[int], params: GenerationParams) -> AsyncGenerator[GeneratedTokens, None]:
        """Stream new tokens after ``prompt_ids``; the last item carries the finish reason.

        Closing the iterator early stops generation within one step and frees its resources.
        """
        ...

    async def score(self, token_ids: Sequence[int], *, top: int) -> list[TokenLogprob]:
        """Log-probability of each of ``token_ids[1:]`` given the tokens before it, with ``top`` alternatives."""
        ...


class TemplateRenderer(Protocol):
    """Turns a conversation into the prompt text the model was trained on."""

    @property
    def supports_tools(self) -> bool:
        """The template shows ``tools`` to the model itself (otherwise the use case describes them in the prompt)."""
        ...

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool,
        tools: Sequence[FunctionTool] = (),
        options: Mapping[str, object] | None = None,
    ) -> str:
        """The prompt for ``messages`` (offering ``tools``), ending with the assistant's turn when asked.

        ``options`` are further variables the template may read (``enable_thinking``, ``reasoning_effort``...).
        """
        ...


class ConstraintChecker(Protocol):
    """Tells, before anything is generated, whether an output constraint can be enforced."""

    def check(self, constraint: OutputConstraint) -> None:
        """Raise ``InvalidRequestError`` (naming ``constraint.param``) when ``constraint`` cannot be enforced."""
        ...


class StopPolicy(Protocol):
    """Where generated text must end, given the server's and the request's stop sequences."""

    def sequences(self, requested: Sequence[str]) -> tuple[str, ...]:
        """All stop sequences that apply to a request: server-wide ones and ``requested``."""
        ...

    def find(self, text: str, sequences: Sequence[str]) -> int | None:
        """Index where the earliest stop sequence starts in ``text``, or ``None``."""
        ...

    def safe_length(self, text: str, sequences: Sequence[str]) -> int:
        """How much of ``text`` can be released: its end may still become a stop sequence."""
        ...
