"""Diverse (group) beam search as a transformers ``custom_generate`` function.

Vijayakumar et al., "Diverse Beam Search" (arXiv:1610.02424): the ``num_beams`` beams are split into
``num_beam_groups`` groups that each run beam search; at every step a group's scores are lowered by
``diversity_penalty`` times the number of times earlier groups already chose each token at that step (Hamming
diversity). The best finished hypothesis over all groups is returned.

transformers 5 moved this mode out of its core to the Hub repo ``transformers-community/group-beam-search``; this file
keeps it available offline. Load it with ``model.generate(..., custom_generate=<dir holding custom_generate/>,
trust_remote_code=True)``. It takes one prompt and supports neither sampling nor ``return_dict_in_generate``.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria

from adapters.huggingface.transformers_compat import (
    eos_token_tensor,
    pad_token_tensor,
    prefill,
    reorder_cache,
    update_model_kwargs,
)

_DEAD = -1e9
"""Score of a placeholder beam: low enough never to win, finite so sums stay comparable."""


def generate(model: Any, *args: Any, **kwargs: Any) -> torch.Tensor:  # noqa: ANN401  transformers' contract
    """``model.generate`` with diverse beam search as its decoding method."""
    # generate() forgets the tokenizer when the decoding method is a callable, so stop strings become a criterion here.
    tokenizer = kwargs.pop("tokenizer", None)
    stop_strings = kwargs.pop("stop_strings", None)
    config = kwargs.get("generation_config")
    if config is not None and config.stop_strings:
        stop_strings = stop_strings or config.stop_strings
        kwargs["generation_config"] = config = copy.deepcopy(config)
        config.stop_strings = None
    if stop_strings:
        if tokenizer is None:
            msg = "stop strings need the `tokenizer` argument"
            raise ValueError(msg)
        criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
        criteria.append(StopStringCriteria(tokenizer, stop_strings))
        kwargs["stopping_criteria"] = criteria
    output: torch.Tensor = GenerationMixin.generate(model, *args, custom_generate=_group_beam_search, **kwargs)
    return output


class _Group:
    """One group of beams: its rows in the beam batch and the best ``size`` sequences it has finished."""

    def __init__(self, first: int, size: int, length_penalty: float) -> None:
        self.rows = slice(first, first + size)
        self.size = size
        self.length_penalty = length_penalty
        self.finished: list[tuple[float, torch.Tensor]] = []
        self.done = False

    def finish(self, tokens: torch.Tensor, sum_log_probs: float) -> None:
        """Keep the generated ``tokens`` if they are among the group's best ``size``, by length-normalised score."""
        score = sum_log_probs / max(1, tokens.shape[-1]) ** self.length_penalty
        self.finished.append((score, tokens))
        self.finished.sort(key=lambda hypothesis: hypothesis[0], reverse=True)
        del self.finished[self.size :]

    def can_stop(self, best_running: float, generated: int, max_generated: int, early_stopping: bool | str) -> bool:
        """Whether no running beam can beat the worst finished sequence any more."""
        if len(self.finished) < self.size:
            return False
        if early_stopping is True:
            return True
        length = max_generated if early_stopping == "never" and self.length_penalty > 0 else generated
        attainable: float = best_running / max(1, length) ** self.length_penalty
        return self.finished[-1][0] >= attainable


@dataclasses.dataclass(frozen=True)
class _Search:
    """The settings every step needs."""

    prompt_length: int
    max_length: int
    diversity_penalty: float
    early_stopping: bool | str
    eos: torch.Tensor


@dataclasses.dataclass
class _Step:
    """What one decoding step decided for every beam: which beam it continues, with which token, at what score."""

    sources: torch.Tensor
    tokens: torch.Tensor
    scores: torch.Tensor


def _group_beam_search(
    model: Any,  # noqa: ANN401  a GenerationMixin model
    input_ids: torch.Tensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    **model_kwargs: Any,  # noqa: ANN401  forwarded to the model
) -> torch.Tensor:
    """Diverse beam search over ``input_ids``, the prompt repeated ``num_beams`` times."""
    num_beams, num_groups = generation_config.num_beams, generation_config.num_beam_groups
    if input_ids.shape[0] != num_beams or num_beams % num_groups:
        msg = "group beam search takes one prompt and num_beams divisible by num_beam_groups"
        raise ValueError(msg)
    if generation_config.do_sample or generation_config.return_dict_in_generate:
        msg = "group beam search supports neither sampling nor return_dict_in_generate"
        raise ValueError(msg)
    group_size = num_beams // num_groups
    length_penalty = 1.0 if generation_config.length_penalty is None else generation_config.length_penalty
    groups = [_Group(first, group_size, length_penalty) for first in range(0, num_beams, group_size)]
    eos = eos_token_tensor(generation_config)  # the prepared EOS ids
    search = _Search(
        prompt_length=input_ids.shape[1],
        max_length=generation_config.max_length,
        diversity_penalty=generation_config.diversity_penalty or 0.0,
        early_stopping=generation_config.early_stopping or False,
        eos=torch.empty(0, dtype=torch.long, device=input_ids.device) if eos is None else eos.reshape(-1),
    )
    beam_scores = torch.full((num_beams,), _DEAD, device=input_ids.device)
    beam_scores[::group_size] = 0.0  # one live beam per group, or every beam would pick the same tokens

    outputs = prefill(model, input_ids, generation_config, model_kwargs)  # as core beam search does
    while True:
        model_kwargs = update_model_kwargs(model, outputs, model_kwargs)
        log_probs = torch.log_softmax(outputs.logits[:, -1, :].to(torch.float32), dim=-1)
        del outputs
        log_probs = logits_processor(input_ids, log_probs) + beam_scores[:, None]  # type: ignore[arg-type]
        step = _diverse_step(groups, input_ids, log_probs, stopping_criteria, search)
        if all(group.done for group in groups):
            break
        input_ids = torch.cat([input_ids[step.sources], step.tokens[:, None]], dim=-1)
        beam_scores = step.scores
        _reorder_cache(model, model_kwargs, step.sources)
        model_inputs = model.prepare_inputs_for_generation(
            input_ids, next_sequence_length=1 if model_kwargs.get("use_cache") else None, **model_kwargs
        )
        outputs = model(**model_inputs, return_dict=True)

    return _best_sequences(groups, input_ids, beam_scores, search.prompt_length, generation_config)


def _diverse_step(
    groups: list[_Group],
    input_ids: torch.Tensor,
    scores: torch.Tensor,
    stopping_criteria: StoppingCriteriaList,
    search: _Search,
) -> _Step:
    """Extend each group in turn, penalising the tokens earlier groups chose (Hamming diversity)."""
    num_beams, vocab_size = scores.shape
    device = input_ids.device
    generated = input_ids.shape[1] + 1 - search.prompt_length
    candidates_per_group = max(2, 1 + len(search.eos))
    step = _Step(
        sources=torch.arange(num_beams, device=device),
        tokens=torch.zeros(num_beams, dtype=torch.long, device=device),
        scores=torch.full((num_beams,), _DEAD, device=device),
    )
    chosen = torch.zeros(vocab_size, device=device)  # how often earlier groups picked each token at this step
    for group in groups:
        first, size = group.rows.start, group.size
        group_scores = scores[group.rows] - search.diversity_penalty * chosen
        top_scores, top_indices = group_scores.reshape(-1).topk(candidates_per_group * size)
        top_sources = top_indices // vocab_size + first
        top_tokens = top_indices % vocab_size
        candidates = torch.cat([input_ids[top_sources], top_tokens[:, None]], dim=-1)
        finished = stopping_criteria(candidates, None) | torch.isin(top_tokens, search.eos)
        kept = 0
        for rank in range(len(top_tokens)):
            if finished[rank] and rank < size and not group.done:
                group.finish(candidates[rank, search.prompt_length :], float(top_scores[rank]))
            elif not finished[rank] and kept < size:
                row = first + kept
                step.sources[row], step.tokens[row] = top_sources[rank], top_tokens[rank]
                step.scores[row] = top_scores[rank]
                kept += 1
        if kept == 0:
            group.done = True
            continue
        step.sources[first + kept : first + size] = step.sources[first]  # placeholders, scored dead
        step.tokens[first + kept : first + size] = step.tokens[first]
        if not group.done:  # a finished group no longer steers the others
            chosen += torch.bincount(step.tokens[first : first + kept], minlength=vocab_size)
        best_running = float(step.scores[group.rows].max())
        group.done = group.done or group.can_stop(
            best_running, generated, search.max_length - search.prompt_length, search.early_stopping
        )
    return step


def _best_sequences(
    groups: list[_Group],
    input_ids: torch.Tensor,
    beam_scores: torch.Tensor,
    prompt_length: int,
    generation_config: GenerationConfig,
) -> torch.Tensor:
    """The ``num_return_sequences`` best finished hypotheses of all groups (running beams if too few finished)."""
    count = generation_config.num_return_sequences or 1
    ranked = sorted((hypothesis for group in groups for hypothesis in group.finished), key=lambda h: -h[0])
    chosen = [tokens for _, tokens in ranked[:count]]
    chosen += [
        input_ids[int(row), prompt_length:] for row in beam_scores.argsort(descending=True)[: count - len(chosen)]
    ]
    pad = pad_token_tensor(generation_config)
    length = prompt_length + max(tokens.shape[0] for tokens in chosen)
    sequences = input_ids.new_full((count, length), int(pad.reshape(-1)[0]) if pad is not None else 0)
    sequences[:, :prompt_length] = input_ids[0, :prompt_length]
    for row, tokens in enumerate(chosen):
        sequences[row, prompt_length : prompt_length + tokens.shape[0]] = tokens
    return sequences


def _reorder_cache(model: Any, model_kwargs: dict[str, Any], beam_indices: torch.Tensor) -> None:  # noqa: ANN401
    """Make the key/value cache follow the beams that survived this step."""
    cache = model_kwargs.get("cache")
    if cache is None:
        return
    model_kwargs["cache"] = reorder_cache(model, cache, beam_indices)
