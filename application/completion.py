"""The (legacy) text completion use case."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from application.chat import choice_params
from application.generation import ChoiceJob, Prompt, TextGeneration
from domain.errors import InvalidRequestError
from domain.generation import CompletionStream, GenerationParams

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for ``/v1/completions``."""

PromptInput = str | Sequence[int]
"""A prompt as text, or as token ids."""


@attrs.define
class CompletionService:
    """Continues raw prompts, optionally echoing each back in front of its continuation."""

    generation: TextGeneration

    def stream(
        self, prompts: Sequence[PromptInput], params: GenerationParams, *, n: int = 1, echo: bool = False
    ) -> CompletionStream:
        """Check the request now, then stream ``n`` continuations of every prompt.

        Choice ``p * n + i`` is the ``i``-th continuation of prompt ``p``, as OpenAI orders them. Errors in the
        request (context length) are raised by this call, before anything is generated.
        """
        if not prompts:
            raise InvalidRequestError("prompt must not be empty", param="prompt")
        jobs = []
        for number, given in enumerate(prompts):
            prompt = self._prompt(given)
            budgeted = self.generation.budget(prompt, params, default_max_tokens=DEFAULT_MAX_TOKENS)
            jobs += [ChoiceJob(prompt, choice_params(budgeted, i), number * n + i, echo) for i in range(n)]
        return self.generation.run(jobs)

    def _prompt(self, given: PromptInput) -> Prompt:
        if isinstance(given, str):
            return self.generation.tokenize(given, add_special_tokens=True)
        return self.generation.from_token_ids(given)
