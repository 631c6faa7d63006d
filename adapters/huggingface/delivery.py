"""The one bridge from a worker thread (the engine's, the plain generator's) to the coroutine awaiting its steps."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class ThreadToLoop(Generic[T]):
    """Items put from any thread, got in order by a coroutine on the event loop that created this.

    ``put`` answers ``False`` once that loop is gone: the consumer has left, and the worker should stop.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._items: asyncio.Queue[T] = asyncio.Queue()

    def put(self, item: T) -> bool:
        """Hand ``item`` over from any thread; ``False`` when the event loop is gone."""
        try:
            self._loop.call_soon_threadsafe(self._items.put_nowait, item)
        except RuntimeError:
            return False
        return True

    async def get(self) -> T:
        """The next item, waiting for it."""
        return await self._items.get()


__all__ = ["ThreadToLoop"]
