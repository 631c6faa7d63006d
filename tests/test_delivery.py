"""The bridge from worker threads to the event loop: order, one wake-up a burst, and a loop that is gone."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from adapters.huggingface.delivery import ThreadToLoop, held


def counted_wakeups(loop: asyncio.AbstractEventLoop) -> Callable[[], int]:
    """How many times ``loop`` has been woken from another thread since this call (``call_soon_threadsafe``)."""
    calls = 0
    real = loop.call_soon_threadsafe

    def counted(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return real(*args)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    return lambda: calls


def test_a_burst_of_items_for_many_consumers_wakes_the_loop_once_and_keeps_each_ones_order() -> None:
    async def scenario() -> tuple[list[list[int]], int]:
        wakeups = counted_wakeups(asyncio.get_running_loop())
        consumers = [ThreadToLoop[int]() for _ in range(16)]

        def step() -> None:  # an engine step: every row's token, one after the other
            for token in range(3):
                for consumer in consumers:
                    assert consumer.put(token)

        worker = threading.Thread(target=step)
        worker.start()
        worker.join()  # the loop is held meanwhile, as a busy loop would be
        received = [[await consumer.get() for _ in range(3)] for consumer in consumers]
        return received, wakeups()

    received, wakeups = asyncio.run(scenario())
    assert received == [[0, 1, 2]] * 16
    assert wakeups == 1


def test_a_held_burst_wakes_a_free_loop_once_at_the_end_of_the_block() -> None:
    """The loop is free here (awaiting the worker): it would run each delivery before the next item is put."""

    async def scenario() -> tuple[list[list[int]], list[int]]:
        wakeups = counted_wakeups(asyncio.get_running_loop())
        consumers = [ThreadToLoop[int]() for _ in range(8)]

        def step() -> list[int]:
            with held():
                for token in range(2):
                    for consumer in consumers:
                        assert consumer.put(token)
                        time.sleep(0.001)  # time for a woken loop to deliver
                with held():  # a block inside another delivers with the outer one
                    assert consumers[0].put(9)
                inside = wakeups()
            return [inside, wakeups()]

        counts = await asyncio.to_thread(step)
        received = [[await consumer.get() for _ in range(2)] for consumer in consumers]
        assert await consumers[0].get() == 9
        return received, counts

    received, counts = asyncio.run(scenario())
    assert received == [[0, 1]] * 8
    assert counts == [0, 1]


def test_items_keep_coming_after_a_delivery_and_put_says_false_once_the_loop_is_gone() -> None:
    async def scenario() -> ThreadToLoop[str]:
        consumer = ThreadToLoop[str]()
        for word in ("one", "two"):
            await asyncio.to_thread(consumer.put, word)
            assert await consumer.get() == word  # each a burst of its own, each delivered
        return consumer

    consumer = asyncio.run(scenario())
    assert consumer.put("late") is False


def test_a_loop_that_is_over_is_not_kept_alive_by_its_mailbox() -> None:
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def scenario() -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        ThreadToLoop[int]()

    for _ in range(3):
        asyncio.run(scenario())
    gc.collect()
    assert [loop() for loop in loops] == [None, None, None]
