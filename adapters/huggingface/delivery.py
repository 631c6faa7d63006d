"""The one bridge from a worker thread (the engine's, the plain generator's) to the coroutine awaiting its steps."""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class ThreadToLoop(Generic[T]):
    """Items put from any thread, got in order by a coroutine on the event loop that created this.

    ``put`` answers ``False`` once that loop is gone: the consumer has left, and the worker should stop.
    """

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[T] = asyncio.Queue()
        self._mailbox = _mailbox_of(loop)

    def put(self, item: T) -> bool:
        """Hand ``item`` over from any thread; ``False`` when the event loop is gone."""
        return self._mailbox.post(self._items, item)

    async def get(self) -> T:
        """The next item, waiting for it."""
        return await self._items.get()


class _Mailbox:
    """What worker threads hand one event loop, delivered together: one wake-up of the loop for a burst of items.

    A batched decoding step hands every row its token at once; each hand-over woke the loop on its own (a write to
    its self-pipe, and the loop's thread taking the GIL in the middle of the step). Now the first item of a burst
    schedules the delivery, and the items that come before the loop runs it go with it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        """Weakly: `_mailboxes` holds the mailbox as long as the loop lives, so a strong reference would keep both."""
        self._lock = threading.Lock()
        self._waiting: list[tuple[asyncio.Queue[Any], Any]] = []

    def post(self, queue: asyncio.Queue[Any], item: object) -> bool:
        """Queue ``item`` for ``queue``, waking the loop unless a delivery is already on its way."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            return False
        with self._lock:
            self._waiting.append((queue, item))
            if len(self._waiting) > 1:
                return True
        try:
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # closed meanwhile
            return False
        return True

    def _deliver(self) -> None:
        with self._lock:
            waiting, self._waiting = self._waiting, []
        for queue, item in waiting:
            queue.put_nowait(item)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
_making = threading.Lock()


def _mailbox_of(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    """``loop``'s mailbox, made by the first `ThreadToLoop` created on it."""
    with _making:
        mailbox = _mailboxes.get(loop)
        if mailbox is None:
            mailbox = _mailboxes[loop] = _Mailbox(loop)
    return mailbox


__all__ = ["ThreadToLoop"]
