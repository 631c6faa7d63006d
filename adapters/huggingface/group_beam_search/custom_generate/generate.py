"""Diverse (group) beam search as a transformers ``custom_generate`` function.

Vijayakumar et al., "Diverse Beam Search" (arXiv:1610.02424): the ``num_beams`` beams are split into
``num_beam_groups`` groups that each run beam search; at every step a group's scores are lowered by
``diversity_penalty`` times the number of times earlier groups already chose each token at that step (Hamming
diversity). The best finished hypothesis over all groups is returned.

transformers 5 moved this mode out of its core to the Hub repo ``transformers-community/group-beam-search``; this file
keeps it available offline. Load it with ``model.generate(..., custom_generate=<dir holding custom_generate/>,
trust_remote_code=True)``. It supports one prompt, no sampling and no ``return_dict_in_generate``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.stopping_criteria import StopStringCriteria

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
        kwargs["generation_config"] = config = GenerationConfig.from_dict(config.to_dict() | {"stop_strings": None})
    if stop_strings:
        if tokenizer is None:
            msg = "stop strings need the `tokenizer` argument"
            raise ValueError(msg)
        criteria = StoppingCriteriaList(kwargs.get("stopping_criteria") or [])
        criteria.append(StopStringCriteria(tokenizer, stop_strings))
        kwargs["stopping_criteria"] = criteria
    return GenerationMixin.generate(model, *args, custom_generate=_group_beam_search, **kwargs)


class _Hypotheses:
    """The best ``size`` finished sequences of one group, scored by length-normalised log-probability."""

    def __init__(self, size: int, length_penalty: float) -> None:
        self.size = size
        self.length_penalty = length_penalty
        self.best: list[tuple[float, torch.Tensor]] = []

    def add(self, tokens: torch.Tensor, sum_log_probs: float) -> None:
        """Keep ``tokens`` if it is among the best ``size``."""
        score = sum_log_probs / max(1, tokens.shape[-1]) ** self.length_penalty
        self.best.append((score, tokens))
        self.best.sort(key=lambda hypothesis: hypothesis[0], reverse=True)
        del self.best[self.size :]

    def is_done(self, best_running: float, generated: int, max_generated: int, early_stopping: bool | str) -> bool:
        """Whether no running beam can beat the worst kept hypothesis any more."""
        if len(self.best) < self.size:
            return False
        if early_stopping is True:
            return True
        length = max_generated if early_stopping == "never" and self.length_penalty > 0 else generated
        return self.best[-1][0] >= best_running / max(1, length) ** self.length_penalty


def _group_beam_search(
    model: Any,  # noqa: ANN401  a GenerationMixin model
    input_ids: torch.LongTensor,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList,
    generation_config: GenerationConfig,
    **model_kwargs: Any,  # noqa: ANN401  forwarded to the model
) -> torch.Tensor:
    """Diverse beam search over ``input_ids``, the prompt repeated ``num_beams`` times; returns ``(1, length)``."""
    num_beams = generation_config.num_beams
    num_groups = generation_config.num_beam_groups
    group_size = num_beams // num_groups
    penalty = generation_config.diversity_penalty or 0.0
    length_penalty = 1.0 if generation_config.length_penalty is None else generation_config.length_penalty
    early_stopping = generation_config.early_stopping or False
    eos = generation_config._eos_token_tensor  # noqa: SLF001  the prepared EOS ids
    eos = torch.empty(0, dtype=torch.long, device=input_ids.device) if eos is None else eos.reshape(-1)
    if input_ids.shape[0] != num_beams or num_beams % num_groups:
        msg = "group beam search takes one prompt and num_beams divisible by num_beam_groups"
        raise ValueError(msg)
    if generation_config.do_sample or generation_config.return_dict_in_generate:
        msg = "group beam search supports neither sampling nor return_dict_in_generate"
        raise ValueError(msg)

    prompt_length = input_ids.shape[1]
    max_generated = generation_config.max_length - prompt_length
    candidates_per_group = max(2, 1 + eos.numel()) * group_size
    beam_scores = torch.full((num_beams,), _DEAD, device=input_ids.device)
    beam_scores[::group_size] = 0.0  # one live beam per group, or every beam would pick the same tokens
    hypotheses = [_Hypotheses(group_size, length_penalty) for _ in range(num_groups)]
    done = [False] * num_groups

    outputs = model._prefill(input_ids, generation_config, model_kwargs)  # noqa: SLF001  as core beam search does
    while True:
        model_kwargs = model._update_model_kwargs_for_generation(  # noqa: SLF001
            outputs, model_kwargs, is_encoder_decoder=model.config.is_encoder_decoder
        )
        log_probs = torch.log_softmax(outputs.logits[:, -1, :].to(torch.float32), dim=-1)
        del outputs
        log_probs = logits_processor(input_ids, log_probs)
        vocab_size = log_probs.shape[-1]
        generated = input_ids.shape[1] + 1 - prompt_length

        sources = torch.arange(num_beams, device=input_ids.device)
        tokens = torch.zeros(num_beams, dtype=torch.long, device=input_ids.device)
        scores = torch.full((num_beams,), _DEAD, device=input_ids.device)
        chosen = torch.zeros(vocab_size, device=input_ids.device)  # how often earlier groups picked each token
        for group in range(num_groups):
            first = group * group_size
            rows = slice(first, first + group_size)
            group_scores = log_probs[rows] - penalty * chosen + beam_scores[rows, None]
            top_scores, top_indices = group_scores.reshape(-1).topk(candidates_per_group)
            top_sources = top_indices // vocab_size + first
            top_tokens = top_indices % vocab_size
            sequences = torch.cat([input_ids[top_sources], top_tokens[:, None]], dim=-1)
            finished = stopping_criteria(sequences, None) | torch.isin(top_tokens, eos)
            kept = 0
            for rank in range(candidates_per_group):
                if finished[rank]:
                    if rank < group_size and not done[group]:
                        hypotheses[group].add(sequences[rank, prompt_length:], float(top_scores[rank]))
                elif kept < group_size:
                    row = first + kept
                    sources[row], tokens[row], scores[row] = top_sources[rank], top_tokens[rank], top_scores[rank]
                    kept += 1
            if kept == 0:
                done[group] = True
            else:
                sources[first + kept : first + group_size] = sources[first]
                tokens[first + kept : first + group_size] = tokens[first]
            chosen += torch.bincount(tokens[first : first + kept], minlength=vocab_size)
            best_running = float(scores[rows].max())
            done[group] = done[group] or hypotheses[group].is_done(
                best_running, generated, max_generated, early_stopping
            )
        if all(done):
            break

        input_ids = torch.cat([input_ids[sources], tokens[:, None]], dim=-1)
        beam_scores = scores
        _reorder_cache(model, model_kwargs, sources)
        model_inputs = model.prepare_inputs_for_generation(
            input_ids, next_sequence_length=1 if model_kwargs.get("use_cache") else None, **model_kwargs
        )
        outputs = model(**model_inputs, return_dict=True)

    finished_hypotheses = [hypothesis for group in hypotheses for hypothesis in group.best]
    if finished_hypotheses:
        best = max(finished_hypotheses, key=lambda hypothesis: hypothesis[0])[1]
    else:
        best = input_ids[int(beam_scores.argmax()), prompt_length:]
    return torch.cat([input_ids[0, :prompt_length], best])[None, :]


def _reorder_cache(model: Any, model_kwargs: dict[str, Any], beam_indices: torch.Tensor) -> None:  # noqa: ANN401
    """Make the key/value cache follow the beams that survived this step."""
    cache = model_kwargs.get("cache")
    if cache is None:
        return
    if hasattr(model, "_reorder_cache"):
        model_kwargs["cache"] = model._reorder_cache(cache, beam_indices)  # noqa: SLF001
    else:
        cache.reorder_cache(beam_indices)
