"""Logits processors for what OpenAI defines and ``transformers`` lacks: additive penalties, logprob recording."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from domain.generation import GenerationParams, TokenLogprob


class OpenAIPenalties(LogitsProcessor):
    """``presence_penalty`` and ``frequency_penalty`` as OpenAI defines them, over the generated tokens only.

    ``logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty``
    """

    def __init__(self, *, prompt_length: int, presence: float, frequency: float) -> None:
        self._prompt_length = prompt_length
        self._presence = presence
        self._frequency = frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Penalise the scores of tokens already generated in each row."""
        generated = input_ids[:, self._prompt_length :]
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        penalty = counts * self._frequency + (counts > 0).to(scores.dtype) * self._presence
        return scores - penalty  # type: ignore[return-value]


class LogprobRecorder(LogitsProcessor):
    """Keeps the log-softmax of the final scores of the latest step, to report the chosen token's log-probability.

    It runs last, so the distribution is the one the token was picked from (temperature and filters included;
    with greedy decoding that is the model's own distribution after any penalties).
    """

    def __init__(self, top: int) -> None:
        self.top = top
        self.latest: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Record, and pass the scores on unchanged."""
        del input_ids
        self.latest = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def logprobs_of(self, token_ids: list[int]) -> tuple[TokenLogprob, ...]:
        """Log-probabilities of the tokens just chosen (one per row), from the latest recorded step."""
        if self.latest is None:
            return ()
        return tuple(token_logprob(self.latest[row], token, self.top) for row, token in enumerate(token_ids))


def token_logprob(logprobs: torch.Tensor, token_id: int, top: int) -> TokenLogprob:
    """``token_id``'s entry of one position's log-probabilities, with the ``top`` best alternatives."""
    alternatives: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, indices = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        alternatives = tuple(zip(indices.tolist(), values.tolist(), strict=True))
    chosen = logprobs[token_id]
    rank = int((logprobs > chosen).sum()) + 1
    return TokenLogprob(token_id=token_id, logprob=float(chosen), top=alternatives, rank=rank)


def request_processors(
    params: GenerationParams, *, prompt_length: int, constraint: LogitsProcessor | None = None
) -> tuple[LogitsProcessorList, LogprobRecorder | None]:
    """A request's own processors, and its logprob recorder if it asked for logprobs.

    They run after the ones ``generate`` builds from the config: OpenAI's penalties, then the output ``constraint``,
    then the recorder, which must see the final distribution.
    """
    processors = LogitsProcessorList()
    if params.presence_penalty or params.frequency_penalty:
        processors.append(
            OpenAIPenalties(
                prompt_length=prompt_length, presence=params.presence_penalty, frequency=params.frequency_penalty
            )
        )
    if constraint is not None:
        processors.append(constraint)
    recorder = None if params.logprobs is None else LogprobRecorder(params.logprobs)
    if recorder is not None:
        processors.append(recorder)
    return processors, recorder
