"""The engine thread: admit newcomers, prefill them, run one decoding step for every running row, let rows go."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import attrs
import structlog
import torch

from adapters.huggingface import delivery
from adapters.huggingface.engine import rows as row_ops
from adapters.huggingface.engine.kv_batch import KVBatch
from adapters.huggingface.engine.prefill import groups, prefill_group, remember_prefixes
from adapters.huggingface.engine.speculative import DraftCounts, Speculation, pause_after, propose
from domain.errors import GenerationError
from domain.generation import GeneratedTokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from adapters.huggingface.engine.forward import Forward
    from adapters.huggingface.engine.rows import Row
    from adapters.huggingface.engine.scheduler import Scheduler
    from adapters.huggingface.prefix_cache import PrefixCache

log = structlog.get_logger(__name__)


@attrs.define
class EngineLoop:
    """Owns the model for batched decoding, on one thread started with the first request."""

    forward: Forward
    tokenizer: PreTrainedTokenizerBase
    scheduler: Scheduler
    prefixes: PrefixCache | None = None
    """Keys and values of prompt blocks seen before; turned off (``None``) if caching ever fails."""
    speculation: Speculation = attrs.field(factory=Speculation)
    drafts: DraftCounts = attrs.field(factory=DraftCounts)
    """Draft tokens proposed and kept so far."""
    _batch: KVBatch = attrs.field(init=False, factory=KVBatch)
    _thread: threading.Thread | None = attrs.field(init=False, default=None)

    @property
    def running(self) -> int:
        """How many rows decode now."""
        return len(self._batch.rows)

    def start(self) -> None:
        """Start the engine thread unless it runs (the scheduler calls this under its lock)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="batching-engine", daemon=True)
            self._thread.start()

    def alive(self) -> bool:
        """Whether the engine thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the engine thread to end (once the scheduler is closed)."""
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=timeout)

    def _run(self) -> None:
        with torch.inference_mode():
            while (admitted := self.scheduler.admit(self.running, self._to_compute)) is not None:
                try:
                    if admitted:
                        self._prefill(admitted)
                    self._release_done()
                    if self._batch.rows:
                        self._step()
                        self._release_done()
                except Exception as error:  # noqa: BLE001  the rows' consumers re-raise it
                    row_ops.fail(self._batch.rows, error)
                    self._batch = KVBatch()
        row_ops.fail([*self._batch.rows, *self.scheduler.drain()], GenerationError("The generator is shut down."))
        self._batch = KVBatch()

    def _to_compute(self, row: Row) -> int:
        """Prompt tokens of ``row`` its prefill must compute: those the prefix cache does not hold."""
        cached = self.prefixes.cached_tokens(row.prompt_ids, adapter=row.params.adapter) if self.prefixes else 0
        return len(row.prompt_ids) - cached

    def _prefill(self, rows: list[Row]) -> None:
        """Prefill newcomers in groups that fit the token budget, sample their first token, and merge them in."""
        ready: list[Row] = []
        for row in rows:
            try:
                row_ops.prepare(row, self.forward.model, self.tokenizer)
            except Exception as error:  # noqa: BLE001  only this request is at fault
                row_ops.fail([row], error)
            else:
                ready.append(row)
        ready.sort(key=lambda r: len(r.prompt_ids))
        for group in groups(ready, 4 * self.scheduler.limits.prefill_tokens):  # padding may take a group past it
            try:
                if self.prefixes is not None:
                    for row in group:
                        row.reused = self.prefixes.match(row.prompt_ids, adapter=row.params.adapter)
                cache, mask, logits = prefill_group(self.forward, group)
            except Exception as error:  # noqa: BLE001  the group's consumers re-raise it
                row_ops.fail(group, error)
                continue
            if self.prefixes is not None and not remember_prefixes(self.prefixes, group, cache, mask):
                self.prefixes = None
            reused = [row.reused_tokens for row in group]
            with delivery.held():
                for index, row in enumerate(group):
                    row.cached, row.reused = len(row.prompt_ids), []  # the blocks are in the batch's cache now
                    row_ops.advance(row, logits[index : index + 1], cached_tokens=reused[index])
            self._batch.add(group, cache, mask)
            log.debug("batching.joined", rows=len(group), running=self.running, reused_tokens=sum(reused))

    def _step(self) -> None:
        """One decoding step for every running row: its last token, and its draft when it has one."""
        batch = self._batch
        device = self.forward.model.device
        length = self.speculation.draft_length(len(batch.rows))
        drafts = [self._draft(row, length) for row in batch.rows]
        if 2 * sum(map(len, drafts)) < len(drafts) * max(map(len, drafts)):
            drafts = [[] for _ in drafts]  # most extra positions would be padding: not worth a wider pass
        fed = 1 + max(map(len, drafts))
        ids = torch.tensor(
            [
                [int(row.ids[0, -1]), *draft, *[0] * (fed - 1 - len(draft))]
                for row, draft in zip(batch.rows, drafts, strict=True)
            ],
            dtype=torch.long,
            device=device,
        )
        positions = torch.tensor([[row.cached] for row in batch.rows], dtype=torch.long, device=device)
        if fed > 1:  # a shorter draft's padding repeats its last position, which stays inside the context window
            lengths = torch.tensor([[len(draft)] for draft in drafts], dtype=torch.long, device=device)
            positions = positions + torch.minimum(torch.arange(fed, dtype=torch.long, device=device), lengths)
        adapters = [row.params.adapter for row in batch.rows]
        logits = self.forward.step(ids, positions, batch.step_mask(fed), batch.cache, adapters)
        kept = []
        with delivery.held():  # the event loop is woken once for every row's tokens
            for index, (row, draft) in enumerate(zip(batch.rows, drafts, strict=True)):
                accepted = 0
                if not row.cancelled.is_set():
                    accepted = row_ops.advance(row, logits[index], draft=draft)
                    self.drafts.record(len(draft), accepted)
                    if draft:
                        row.draft_misses = 0 if accepted else row.draft_misses + 1
                        row.draft_pause = pause_after(row.draft_misses)
                row.cached += 1 + accepted
                kept.append(1 + accepted)
        batch.grow(kept, fed)

    def _draft(self, row: Row, length: int) -> list[int]:
        """Up to ``length`` tokens guessed from the row's own text, within what it may still produce.

        None while the row pauses after drafts it kept nothing of (`speculative.pause_after`).
        """
        if row.draft_pause:
            row.draft_pause -= 1
            return []
        length = min(length, row.room - 1)
        return propose(row.ids[0].tolist(), length) if length > 0 else []

    def _release_done(self) -> None:
        """Hand finished rows their finish reason and drop them, with abandoned ones, from the batch."""
        keep = []
        with delivery.held():
            for index, row in enumerate(self._batch.rows):
                if not row.done:
                    keep.append(index)
                    continue
                if row.finish_reason is not None and not row.cancelled.is_set():
                    row.deliver(GeneratedTokens(finish_reason=row.finish_reason))
                row_ops.release(row)
        if len(keep) < len(self._batch.rows):
            self._batch.keep(keep)
            log.debug("batching.left", running=self.running)


__all__ = ["EngineLoop"]
