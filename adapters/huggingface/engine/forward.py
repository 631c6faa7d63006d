"""One forward pass of the model for the engine, on as many CPU threads as the tuner finds fastest."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import attrs
import torch

from adapters.huggingface.engine.attention import one_query_at_a_time
from adapters.huggingface.lora import selecting

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel

    from adapters.huggingface.engine.decoder import LeanDecoder
    from adapters.huggingface.threads import ThreadTuner


@attrs.define
class Forward:
    """Runs the model over a batch and keeps the last positions' logits; times itself for the thread tuner."""

    model: PreTrainedModel
    threads: ThreadTuner | None = None
    """Picks torch's CPU thread count for each pass; ``None`` leaves torch's setting alone (GPUs)."""
    decoder: LeanDecoder | None = None
    """Runs the decoding steps where it gives transformers' logits exactly (`LeanDecoder.for_model`)."""

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
        The lean decoder runs it where its prefill gives transformers' (`LeanDecoder.prefills`) and no hook waits.
        """
        decoder = self.decoder
        if decoder is not None and decoder.prefills and cache is not None and not decoder.hooked():
            return self._timed(lambda: decoder.prefill(ids, positions, mask, cache, keep=keep), ids, adapters)
        return self._timed(lambda: self.model_pass(ids, positions, mask, cache, keep=keep), ids, adapters)

    def step(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: DynamicCache | None,
        adapters: Sequence[str | None] = (),
    ) -> torch.Tensor:
        """A decoding step (one new position a row) or a verifying pass (several): every new position's logits.

        Each position of a verifying pass rounds as a one-token step at its place would (`one_query_at_a_time`).
        The lean decoder runs it unless forward hooks wait on the modules it stands in for.
        """
        decoder = self.decoder
        if decoder is not None and cache is not None and not decoder.hooked():
            return self._timed(lambda: decoder(ids, positions, mask, cache), ids, adapters)
        return self._timed(lambda: self.model_step(ids, positions, mask, cache), ids, adapters)

    def model_step(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: DynamicCache | None
    ) -> torch.Tensor:
        """`step` through transformers' forward: every new position's logits, in the model's dtype."""
        fed = ids.shape[1]
        with one_query_at_a_time(fed > 1):
            return self.model_pass(ids, positions, mask, cache, keep=fed)

    def model_pass(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: DynamicCache | None, *, keep: int
    ) -> torch.Tensor:
        """Transformers' forward pass: the logits of the last ``keep`` positions, in the model's dtype."""
        outputs = self.model(
            input_ids=ids,
            position_ids=positions,
            attention_mask=None if bool(mask.all()) else mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=keep,
            return_dict=True,
        )
        logits: torch.Tensor = outputs.logits[:, -keep:]
        return logits

    def _timed(
        self, run: Callable[[], torch.Tensor], ids: torch.Tensor, adapters: Sequence[str | None]
    ) -> torch.Tensor:
        """``run()`` with the rows' adapters selected, on the tuner's thread count, as a float32 copy; timed."""
        tuning = (ids.shape[1] > 1, ids.numel().bit_length())  # prefill or decode, and the size of the work
        if self.threads is not None:
            threads = self.threads.pick(tuning)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
        started = time.perf_counter()
        with selecting(adapters or None, ids.device):
            logits = run().to(copy=True, dtype=torch.float32)
        if self.threads is not None:
            self.threads.record(tuning, torch.get_num_threads(), (time.perf_counter() - started) / ids.numel())
        return logits


__all__ = ["Forward"]
