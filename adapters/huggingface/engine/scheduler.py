"""The waiting queue and admission: which requests join the batch at the next step, and when one is refused."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

import attrs
import structlog

from adapters.huggingface.engine.rows import Row, release
from domain.errors import GenerationError, QueueFullError

log = structlog.get_logger(__name__)


@attrs.frozen
class BatchLimits:
    """How much work the engine takes on: running sequences, and requests waiting for a slot."""

    max_batch_size: int = 8
    max_queue: int = 64
    prefill_tokens: int = 256
    """Prompt tokens prefilled between two decoding steps (a longer prompt goes alone).

    A burst of newcomers is prefilled a few at a time, so the first of them stream while the rest wait their turn and
    the running rows stall for a bounded time; one forward pass over more prompts is no faster per token on a CPU.
    """

    def __attrs_post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_queue < 0 or self.prefill_tokens < 1:
            msg = f"max_batch_size and prefill_tokens must be >= 1 and max_queue >= 0, got {self}"
            raise ValueError(msg)

    def queue_full_message(self) -> str:
        """What a refused client reads."""
        return (
            f"The server is busy: {self.max_batch_size} requests are generating and {self.max_queue} are waiting. "
            "Retry shortly."
        )


@attrs.define
class Scheduler:
    """Requests waiting for a slot in the batch; the engine thread takes them in order, a prefill budget at a time.

    Every method is safe to call from any thread.
    """

    limits: BatchLimits
    _waiting: collections.deque[Row] = attrs.field(init=False, factory=collections.deque)
    _condition: threading.Condition = attrs.field(init=False, factory=threading.Condition)
    _closed: bool = attrs.field(init=False, default=False)

    def submit(self, row: Row, *, running: int, start_worker: Callable[[], None]) -> None:
        """Queue ``row`` behind the others (``running`` rows decode now) and make sure a worker takes it.

        Raises:
            GenerationError: the engine is shut down.
            QueueFullError: ``limits.max_queue`` requests already wait for a free slot.

        """
        with self._condition:
            if self._closed:
                raise GenerationError("The generator is shut down.")
            free = self.limits.max_batch_size - running
            if len(self._waiting) - max(free, 0) >= self.limits.max_queue:
                raise QueueFullError(self.limits.queue_full_message())
            self._waiting.append(row)
            start_worker()
            self._condition.notify_all()

    def withdraw(self, row: Row) -> bool:
        """Take ``row`` out of the queue; ``False`` if it is not there (running, or already gone)."""
        with self._condition:
            if not any(waiting is row for waiting in self._waiting):
                return False
            self._waiting.remove(row)
        log.debug("batching.dequeued", reason="client left")
        return True

    def wake(self) -> None:
        """Make the engine look again (a running row was cancelled)."""
        with self._condition:
            self._condition.notify_all()

    def admit(self, running: int, to_compute: Callable[[Row], int]) -> list[Row] | None:
        """Rows to start now, waiting while there is nothing to do; ``None`` once the scheduler is closed.

        As many as free slots allow, and as long as their prompts' tokens still to compute (``to_compute``) fit
        ``limits.prefill_tokens``; a longer prompt goes alone. Rows whose consumer left are let go on the way.
        """
        with self._condition:
            while not self._closed and not self._waiting and not running:
                self._condition.wait()
            if self._closed:
                return None
            admitted: list[Row] = []
            tokens = 0
            while self._waiting and running + len(admitted) < self.limits.max_batch_size:
                row = self._waiting[0]
                if row.cancelled.is_set():
                    release(self._waiting.popleft())
                    continue
                cost = to_compute(row)
                if admitted and tokens + cost > self.limits.prefill_tokens:
                    break
                admitted.append(self._waiting.popleft())
                tokens += cost
            return admitted

    def close(self) -> None:
        """Refuse new rows from now on, and wake the engine so that it fails what waits and stops."""
        with self._condition:
            self._closed = True
            self._condition.notify_all()

    def drain(self) -> list[Row]:
        """The rows still waiting, taken out of the queue."""
        with self._condition:
            rows = list(self._waiting)
            self._waiting.clear()
            return rows


__all__ = ["BatchLimits", "Scheduler"]
