"""Every use of transformers' private API, in one place; ``tests/test_compat.py`` fails clearly when one moves.

The batching engine builds each row's logits processors and stopping criteria with the very helpers ``generate``
uses, so a row decodes as it would alone; it keeps its keys and values in a ``DynamicLayer`` that appends in place;
and the diverse beam search repo steps through ``generate``'s prefill and cache helpers as core beam search does.
None of these is public: each is wrapped here, and nowhere else in the project touches an underscored name of
transformers. ``pyproject.toml`` caps transformers at the newest release the suite passed with.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessorList, StoppingCriteriaList
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import create_causal_mask

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

# --- generate's helpers ----------------------------------------------------------------------------------------------


def prepare_generation_config(model: Any, config: GenerationConfig) -> GenerationConfig:  # noqa: ANN401
    """``config`` completed with the model's generation defaults (``top_k=50``...), as ``generate`` completes it."""
    prepared, _ = model._prepare_generation_config(config)  # noqa: SLF001
    return cast("GenerationConfig", prepared)


def prepare_special_tokens(model: Any, config: GenerationConfig) -> None:  # noqa: ANN401
    """Set ``config``'s EOS, pad and BOS tensors on the model's device, as ``generate`` does."""
    model._prepare_special_tokens(config, kwargs_has_attention_mask=True, device=model.device)  # noqa: SLF001


def logits_processors(
    model: Any,  # noqa: ANN401
    config: GenerationConfig,
    prompt_ids: torch.Tensor,
    custom: LogitsProcessorList,
) -> LogitsProcessorList:
    """The processors ``generate`` would build for ``config`` over ``prompt_ids`` (``[1, length]``), with ``custom``."""
    return cast(
        "LogitsProcessorList",
        model._get_logits_processor(  # noqa: SLF001
            generation_config=config,
            input_ids_seq_length=prompt_ids.shape[-1],
            encoder_input_ids=prompt_ids,
            logits_processor=custom,
            device=model.device,
            model_kwargs={"attention_mask": torch.ones_like(prompt_ids)},
        ),
    )


def stopping_criteria(
    model: Any,  # noqa: ANN401
    config: GenerationConfig,
    tokenizer: PreTrainedTokenizerBase,
) -> StoppingCriteriaList:
    """The stopping criteria ``generate`` would build for ``config`` (length, EOS, stop strings)."""
    return cast(
        "StoppingCriteriaList",
        model._get_stopping_criteria(  # noqa: SLF001
            generation_config=config, stopping_criteria=StoppingCriteriaList(), tokenizer=tokenizer
        ),
    )


def eos_token_tensor(config: GenerationConfig) -> torch.Tensor | None:
    """The EOS ids `prepare_special_tokens` set on ``config``."""
    return config._eos_token_tensor  # noqa: SLF001


def pad_token_tensor(config: GenerationConfig) -> torch.Tensor | None:
    """The pad id `prepare_special_tokens` set on ``config``."""
    return config._pad_token_tensor  # noqa: SLF001


def prefill(model: Any, input_ids: torch.Tensor, config: GenerationConfig, model_kwargs: dict[str, Any]) -> Any:  # noqa: ANN401
    """The prompt's forward pass, as ``generate``'s decoding loops begin."""
    return model._prefill(input_ids, config, model_kwargs)  # noqa: SLF001


def update_model_kwargs(model: Any, outputs: Any, model_kwargs: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN401
    """The model inputs of the next step, after ``outputs`` (cache, attention mask, positions)."""
    return cast(
        "dict[str, Any]",
        model._update_model_kwargs_for_generation(  # noqa: SLF001
            outputs, model_kwargs, is_encoder_decoder=model.config.is_encoder_decoder
        ),
    )


def reorder_cache(model: Any, cache: Any, beam_indices: torch.Tensor) -> Any:  # noqa: ANN401
    """``cache`` made to follow the beams that survived a step: the model's own reordering where it has one."""
    if hasattr(model, "_reorder_cache"):
        return model._reorder_cache(cache, beam_indices)  # noqa: SLF001
    cache.reorder_cache(beam_indices)
    return cache


# --- a decoder's forward --------------------------------------------------------------------------------------------


def causal_mask(
    config: PretrainedConfig,
    embeddings: torch.Tensor,
    attention_mask: torch.Tensor | None,
    cache: DynamicCache,
    positions: torch.Tensor,
) -> torch.Tensor | None:
    """The attention mask a Llama-style model's forward builds for ``embeddings`` after ``cache`` (``None``: causal).

    The same call as ``LlamaModel.forward`` makes (its keywords moved between releases: ``past_key_values`` became
    ``cache``), for the engine's lean prefill to attend exactly as transformers' forward does.
    """
    mask: torch.Tensor | None = create_causal_mask(
        config=config, inputs_embeds=embeddings, attention_mask=attention_mask, cache=cache, position_ids=positions
    )
    return mask


# --- the key/value cache's layers ------------------------------------------------------------------------------------


class GrowingLayer(DynamicLayer):  # type: ignore[no-untyped-call]  # transformers' untyped __init_subclass__
    """A ``DynamicLayer`` that appends into spare columns instead of copying its whole cache at every step.

    ``keys``/``values`` stay what ``DynamicLayer`` exposes (``[rows, heads, columns, head_dim]``, here views of the
    first columns of larger buffers), so the batch can still replace them when rows join or leave; the next update
    then moves them into fresh buffers with ``SLACK_COLUMNS`` to spare. ``torch.cat`` on every step copies the whole
    cache of every layer: at batch 16 that was a sixth of a decoding step at 60 tokens, and grows with the context.
    """

    SLACK_COLUMNS = 64

    _views: tuple[torch.Tensor, torch.Tensor] | None = None
    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        *_args: object,
        **_kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new columns after the cached ones and return every cached column."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        keys, values = self._grown(new, key_states)
        keys[:, :, -new:] = key_states
        values[:, :, -new:] = value_states
        return keys, values

    def grow(self, new: int, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached column and ``new`` more after them, for the caller to write.

        ``like``: keys of the layer's rows, heads, head size and dtype (any columns), for a layer that holds none yet.
        """
        if not self.is_initialized:
            if like is None:
                msg = "an empty cache layer grows only like given keys"
                raise ValueError(msg)
            self.lazy_initialization(like, like)
            return self._grown(new, like)
        return self._grown(new, layer_kv(self)[0])

    def _grown(self, new: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached columns and ``new`` unwritten ones, in buffers with room (``like``: rows, heads and head size)."""
        keys, values = layer_kv(self)
        used = self.get_seq_length()
        views, buffers = self._views, self._buffers
        if views is None or buffers is None or views[0] is not keys or used + new > buffers[0].shape[-2]:
            shape = (*like.shape[:2], used + new + self.SLACK_COLUMNS, like.shape[-1])
            buffers = (like.new_empty(shape), like.new_empty(shape))
            if used:
                buffers[0][:, :, :used] = keys
                buffers[1][:, :, :used] = values
            self._buffers = buffers
        self.keys, self.values = buffers[0][:, :, : used + new], buffers[1][:, :, : used + new]
        self._views = (self.keys, self.values)
        return self.keys, self.values

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` columns, in the same buffers: the next update writes after them."""
        keys, values = layer_kv(self)
        replaced = self._views is None or self._views[0] is not keys
        self.keys, self.values = keys[:, :, :max_length], values[:, :, :max_length]
        if not replaced:
            self._views = (self.keys, self.values)


def crop_cache(cache: DynamicCache, columns: int) -> None:
    """Cut every layer of ``cache`` to its first ``columns`` columns (drafted tokens that were not kept)."""
    for layer in cache_layers(cache):
        if isinstance(layer, GrowingLayer):
            layer.crop(columns)
        else:
            keys, values = layer_kv(layer)
            layer.keys, layer.values = keys[:, :, :columns], values[:, :, :columns]


def growing_cache(config: PretrainedConfig) -> DynamicCache:
    """An empty cache for ``config``'s layers, each a `GrowingLayer`."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() for _ in cache.layers]  # type: ignore[no-untyped-call]
    return cache


def has_plain_layers(config: PretrainedConfig) -> bool:
    """Whether ``config``'s cache is one plain ``DynamicLayer`` per layer, what `GrowingLayer` can stand in for."""
    cache = DynamicCache(config=config)
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def cache_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers (plain ``DynamicLayer`` or `GrowingLayer` ones)."""
    return cast("list[DynamicLayer]", cache.layers)


def layer_kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's key and value tensors, ``[rows, heads, columns, head_dim]``."""
    return cast("torch.Tensor", layer.keys), cast("torch.Tensor", layer.values)


__all__ = [
    "GrowingLayer",
    "cache_layers",
    "causal_mask",
    "crop_cache",
    "eos_token_tensor",
    "growing_cache",
    "has_plain_layers",
    "layer_kv",
    "logits_processors",
    "pad_token_tensor",
    "prefill",
    "prepare_generation_config",
    "prepare_special_tokens",
    "reorder_cache",
    "stopping_criteria",
    "update_model_kwargs",
]
