"""Logits processors for what OpenAI defines and ``transformers`` lacks: additive penalties, logprob recording.

And the engine's way to run a row's processors at every step (``apply``, over a list ``lean`` made cheaper), and to
check its stopping criteria (`LeanStopping`).
"""

from __future__ import annotations

import math

import torch
from transformers import (
    EosTokenCriteria,
    LogitsProcessor,
    LogitsProcessorList,
    MaxLengthCriteria,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    StoppingCriteriaList,
)

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


class HoldEnd(LogitsProcessor):
    """End-of-sequence tokens held back while a row has fewer than ``minimum`` tokens after its first ``skip``.

    The scores of transformers' ``MinLengthLogitsProcessor`` (``skip=0``) and ``MinNewTokensLengthLogitsProcessor``
    (``skip``: the prompt), without the mask over the whole vocabulary they build at every step, even once the
    minimum is reached: with ``ignore_eos`` (a minimum of ``max_tokens``) that mask was most of a row's step.
    """

    def __init__(self, *, minimum: int, eos_token_ids: torch.Tensor, skip: int = 0) -> None:
        self.minimum = minimum
        self.eos_token_ids = eos_token_ids.reshape(-1).long()
        self.skip = skip

    def same_as(self, other: object) -> bool:
        """Whether ``other`` holds back the same tokens up to the same length (so one of the two is enough)."""
        return (
            isinstance(other, HoldEnd)
            and self.minimum + self.skip == other.minimum + other.skip
            and torch.equal(self.eos_token_ids.cpu(), other.eos_token_ids.cpu())
        )

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """``scores`` with the EOS entries at -inf while the row is short of its minimum, else ``scores`` itself."""
        if input_ids.shape[-1] - self.skip >= self.minimum:
            return scores
        return scores.index_fill(-1, self.eos_token_ids.to(scores.device), -math.inf)  # type: ignore[return-value]


def lean(processors: LogitsProcessorList) -> LogitsProcessorList:
    """``processors`` with the minimum-length ones replaced by ``HoldEnd``, which gives the same scores for less.

    ``generate`` turns ``min_new_tokens`` into a ``min_length`` as well, so the two often hold back the same tokens
    up to the same length: one of them is then kept.
    """
    replaced = LogitsProcessorList()
    for processor in processors:
        leaner = processor
        if type(processor) is MinLengthLogitsProcessor:
            leaner = HoldEnd(minimum=processor.min_length, eos_token_ids=processor.eos_token_id)
        elif type(processor) is MinNewTokensLengthLogitsProcessor:
            leaner = HoldEnd(
                minimum=processor.min_new_tokens,
                eos_token_ids=processor.eos_token_id,
                skip=processor.prompt_length_to_skip,
            )
        if not any(isinstance(kept, HoldEnd) and kept.same_as(leaner) for kept in replaced):
            replaced.append(leaner)
    return replaced


class LeanStopping:
    """A row's stopping criteria as ``generate`` builds them, its length and end-of-sequence ones checked in Python.

    The list's own call makes a tensor for each criterion, then ors them, at every step of every row (30 us a row,
    half a millisecond of a 16-row step); the length and EOS checks are a comparison and a set lookup. Other
    criteria (stop strings) are called as they are.
    """

    def __init__(self, criteria: StoppingCriteriaList) -> None:
        self.max_length: int | None = None
        self.eos: frozenset[int] = frozenset()
        self.others = StoppingCriteriaList()
        for criterion in criteria:
            if type(criterion) is MaxLengthCriteria:
                limit = criterion.max_length
                self.max_length = limit if self.max_length is None else min(self.max_length, limit)
            elif type(criterion) is EosTokenCriteria:
                self.eos |= frozenset(int(token) for token in criterion.eos_token_id.reshape(-1).tolist())
            else:
                self.others.append(criterion)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> bool:
        """Whether the row (``input_ids``: ``[1, length]``) is done, as the criteria's list would say."""
        if self.max_length is not None and input_ids.shape[-1] >= self.max_length:
            return True
        if self.eos and int(input_ids[0, -1]) in self.eos:
            return True
        return bool(self.others) and bool(self.others(input_ids, scores).any())


def apply(processors: LogitsProcessorList, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Run ``processors`` over ``scores`` in order, as calling the list does.

    The list's own call inspects each processor's signature at every step, for extra arguments that none of those
    ``generate`` builds, nor ours, takes.
    """
    for processor in processors:
        scores = processor(input_ids, scores)
    return scores


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
