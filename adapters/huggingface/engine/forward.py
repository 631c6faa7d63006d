"""One forward pass of the model for the engine, on as many CPU threads as the tuner finds fastest."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import torch

from adapters.huggingface.lora import selecting

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel

    from adapters.huggingface.threads import ThreadTuner


@attrs.define
class Forward:
    """Runs the model over a batch and keeps the last position's logits; times itself for the thread tuner."""

    model: PreTrainedModel
    threads: ThreadTuner | None = None
    """Picks torch's CPU thread count for each pass; ``None`` leaves torch's setting alone (GPUs)."""

    def __call__(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: DynamicCache | None,
        adapters: Sequence[str | None] = (),
        *,
        keep: int = 1,
    ) -> torch.Tensor:
        """The model's logits for the last ``keep`` positions of each row, ``[rows, keep, vocab]`` in float32.

        Float32 is what ``generate`` samples from; only those positions go through the output projection.
        ``adapters``: each row's LoRA adapter (``None``: the base model); none given, every row is the base model's.
        """
        tuning = (ids.shape[1] > 1, ids.numel().bit_length())  # prefill or decode, and the size of the work
        if self.threads is not None:
            threads = self.threads.pick(tuning)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        started = time.perf_counter()
        with selecting(adapters or None, ids.device):
            outputs = self.model(
                input_ids=ids,
                position_ids=positions,
                attention_mask=None if bool(mask.all()) else mask,
                cache=cache,
                use_cache=True,
                logits_to_keep=keep,
                return_dict=True,
            )
        logits: torch.Tensor = outputs.logits[:, -keep:].to(copy=True, dtype=torch.float32)
        if self.threads is not None:
            self.threads.record(tuning, torch.get_num_threads(), (time.perf_counter() - started) / ids.numel())
        return logits


__all__ = ["Forward"]
