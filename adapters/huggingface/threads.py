"""How many CPU threads torch may use for one operation while the server runs.

Torch defaults to one intra-op thread per core. A server also needs a core for its event loop (HTTP, tokenizing,
streaming), and every parallel operation waits for its slowest thread: when any other process (or our own event
loop) holds one of the cores, a step that split its work over all of them waits for a descheduled thread. On a
2-core machine that made a decoding step 3-10x slower under load, while on an idle machine all cores decode a batch
of 16 about 1.4x faster than one. Neither count is right everywhere, so the batching engine measures: a
`ThreadTuner` times its forward passes with each candidate count and keeps the faster, trying the other again now and
then, since the load on the machine changes. Fixed counts (``--threads``) and the plain path use cores - 1.
"""

from __future__ import annotations

import contextvars
import functools
import os
import threading
from collections.abc import Callable, Hashable
from typing import ParamSpec, TypeVar

import attrs
import structlog
import torch

log = structlog.get_logger(__name__)

T = TypeVar("T")
P = ParamSpec("P")


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_threads(cores: int | None = None) -> int:
    """One intra-op thread per core but one (the event loop's), and at least one."""
    return max(1, (available_cores() if cores is None else cores) - 1)


def configure_threads(requested: int | None, *, device: torch.device) -> int | None:
    """Set torch's intra-op threads for CPU inference (``requested``, else `default_threads`); ``None`` on a GPU."""
    if device.type != "cpu":
        return None
    threads = requested if requested is not None else default_threads()
    torch.set_num_threads(threads)
    log.info("torch.threads", intra_op=threads, requested=requested)
    return threads


def on_own_thread(work: Callable[[], T], *, name: str, threads: int | None = None) -> T:
    """``work()`` on a thread of its own that ends with it (with ``threads`` torch threads if given); its result.

    Torch runs a CPU operation in parallel on an OpenMP team that belongs to the calling thread and stays, idle,
    as long as that thread lives. GNU OpenMP, which torch's CPU builds use, counts the threads of every team: once
    they outnumber the cores, each team's threads sleep between two parallel regions instead of spinning, and every
    region of every team waits for its threads to wake. The model loaded on a worker thread that stayed (asyncio's
    executor keeps its threads) made every decoding step of the engine's thread twice as slow on a 2-core machine:
    19 against 39 ms at batch 1, 35 against 57 ms at batch 16. Torch work outside the engine runs here, so that
    its team ends with it. ``work`` runs in a copy of the caller's context (structlog's bound values included); its
    exception is raised here.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []
    context = contextvars.copy_context()

    def run() -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            outcome.append(context.run(work))
        except BaseException as error:  # noqa: BLE001  re-raised on the caller's thread
            failure.append(error)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def runs_on_own_thread(name: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Decorate a function so that each call runs it with `on_own_thread` (the thread named ``name``)."""

    def decorate(function: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(function)
        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            return on_own_thread(functools.partial(function, *args, **kwargs), name=name)

        return call

    return decorate


@attrs.define
class _Choices:
    """What the tuner knows of one kind of work: seconds per unit with each thread count, and what it is trying."""

    estimates: dict[int, float] = attrs.field(factory=dict)
    recorded: dict[int, int] = attrs.field(factory=dict)
    """The pass each count's estimate was last updated at."""
    picks: int = 0
    trying: int | None = None
    left: int = 0
    settled: float | None = None
    """The best count's estimate when the last burst ended: much slower than that, the others are tried again."""


@attrs.define
class ThreadTuner:
    """Picks torch's intra-op thread count for each forward pass by timing the candidates as they run.

    Work of one kind (``key``: prefill or decode, and its size) runs with the count whose smoothed time per unit is
    lowest. Each untried count is tried first; afterwards a burst of ``burst`` passes with the best other count
    starts every ``explore_every``-th pass of a kind, and as soon as the best count has become ``drift`` times
    slower than when it was last chosen, so a machine that became busy (or idle) is noticed: a burst's first
    recorded time replaces the count's old estimate, the others are smoothed into it. The pass right after a
    change of count is not recorded: it pays for waking or parking threads. Not thread-safe: one engine thread owns
    it.
    """

    choices: tuple[int, ...]
    explore_every: int = 256
    burst: int = 3
    smoothing: float = 0.3
    drift: float = 1.3
    _kinds: dict[Hashable, _Choices] = attrs.field(init=False, factory=dict)
    _current: int | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if not self.choices or min(self.choices) < 1 or self.explore_every < 2 or self.burst < 2:  # noqa: PLR2004
            msg = f"choices must be >= 1, explore_every and burst >= 2, got {self}"
            raise ValueError(msg)

    @classmethod
    def for_cpu(cls, requested: int | None, cores: int | None = None) -> ThreadTuner:
        """``requested`` threads always, else the faster of cores - 1 and every core."""
        if requested is not None:
            return cls((requested,))
        cores = available_cores() if cores is None else cores
        return cls(tuple(sorted({default_threads(cores), cores})))

    def pick(self, key: Hashable) -> int:
        """The thread count for the next pass of ``key``'s kind."""
        if len(self.choices) == 1:
            return self.choices[0]
        kind = self._kinds.setdefault(key, _Choices())
        kind.picks += 1
        if kind.left == 0:
            if kind.trying is not None or kind.settled is None:  # a burst just ended, or none has run yet
                kind.settled = kind.estimates.get(self.best(key))
            kind.trying = None
            untried = [threads for threads in self.choices if threads not in kind.estimates]
            drifted = kind.settled is not None and kind.estimates[self.best(key)] > self.drift * kind.settled
            if untried:
                kind.trying, kind.left = untried[0], self.burst
            elif kind.picks % self.explore_every == 0 or drifted:
                best = self.best(key)
                others = [threads for threads in self.choices if threads != best]
                kind.trying, kind.left = min(others, key=kind.estimates.__getitem__), self.burst
        if kind.trying is not None:
            kind.left -= 1
            return kind.trying
        return self.best(key)

    def record(self, key: Hashable, threads: int, seconds: float) -> None:
        """What a pass of ``key``'s kind with ``threads`` took (per unit of work, any unit, one per kind)."""
        if len(self.choices) == 1:
            return
        switched, self._current = threads != self._current, threads
        if switched:
            return
        kind = self._kinds.setdefault(key, _Choices())
        before = self.best(key) if kind.estimates else None
        estimate = kind.estimates.get(threads)
        stale = kind.picks - kind.recorded.get(threads, kind.picks) > self.burst  # from before the last burst
        if estimate is not None and not stale:
            seconds = estimate + self.smoothing * (seconds - estimate)
        kind.estimates[threads] = seconds
        kind.recorded[threads] = kind.picks
        if len(kind.estimates) == len(self.choices) and (after := self.best(key)) != before:
            log.debug("torch.threads.tuned", kind=key, threads=after, estimates=kind.estimates)

    def best(self, key: Hashable) -> int:
        """The count with the lowest estimate for ``key``'s kind so far (the first choice before any)."""
        estimates = self._kinds[key].estimates if key in self._kinds else {}
        return min(estimates, key=estimates.__getitem__) if estimates else self.choices[0]


__all__ = [
    "ThreadTuner",
    "available_cores",
    "configure_threads",
    "default_threads",
    "on_own_thread",
    "runs_on_own_thread",
]
