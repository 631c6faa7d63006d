"""The one bridge from a worker thread (the engine's, the plain generator's) to the coroutine awaiting its steps."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import weakref
from collections.abc import Iterator
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
    schedules the delivery, and the items that come before the loop runs it go with it; inside `held`, none
    schedules it until the block ends.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        """Weakly: `_mailboxes` holds the mailbox as long as the loop lives, so a strong reference would keep both."""
        self._lock = threading.Lock()
        self._waiting: list[tuple[asyncio.Queue[Any], Any]] = []
        self._scheduled = False
        """Whether a delivery of `_waiting` is on its way to the loop."""

    def post(self, queue: asyncio.Queue[Any], item: object) -> bool:
        """Queue ``item`` for ``queue``, waking the loop unless a delivery is on its way or this thread holds them."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            return False
        with self._lock:
            self._waiting.append((queue, item))
        holding: set[_Mailbox] | None = getattr(_holding, "mailboxes", None)
        if holding is not None:
            holding.add(self)
            return True
        return self.wake()

    def wake(self) -> bool:
        """Schedule the delivery of what waits, unless it is on its way; ``False`` when the loop is gone."""
        loop = self._loop()
        if loop is None or loop.is_closed():
            return False
        with self._lock:
            if self._scheduled or not self._waiting:
                return True
            self._scheduled = True
        try:
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # closed meanwhile
            return False
        return True

    def _deliver(self) -> None:
        with self._lock:
            waiting, self._waiting, self._scheduled = self._waiting, [], False
        for queue, item in waiting:
            queue.put_nowait(item)


_holding = threading.local()
"""``mailboxes``: the mailboxes this thread posted to inside `held`, or none outside it."""


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Hand-overs from this thread wait until the block ends, then each event loop is woken once for all of them.

    The engine advances every row of a step inside it: the first row's token used to wake the loop at once, whose
    thread then took the GIL from the engine's before the next row's (at batch 16 on 2 cores, each of the 16
    hand-overs cost some 50 us of the step).
    """
    outer: set[_Mailbox] | None = getattr(_holding, "mailboxes", None)
    mailboxes: set[_Mailbox] = set() if outer is None else outer
    _holding.mailboxes = mailboxes
    try:
        yield
    finally:
        if outer is None:
            _holding.mailboxes = None
            for mailbox in mailboxes:
                mailbox.wake()


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
_making = threading.Lock()


def _mailbox_of(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    """``loop``'s mailbox, made by the first `ThreadToLoop` created on it."""
    with _making:
        mailbox = _mailboxes.get(loop)
        if mailbox is None:
            mailbox = _mailboxes[loop] = _Mailbox(loop)
    return mailbox


__all__ = ["ThreadToLoop", "held"]
