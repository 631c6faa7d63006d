"""How many CPU threads torch may use for one operation while the server runs.

Torch defaults to one intra-op thread per core. A server also needs a core for its event loop (HTTP, tokenizing,
streaming), and every parallel operation waits for its slowest thread: when any other process (or our own event
loop) holds one of the cores, a step that split its work over all of them waits for a descheduled thread. On a
2-core machine that made a decoding step 3-10x slower under load, while one thread is as fast as two at batch size 1
and about 25% slower at batch 16 on an idle machine. So the default leaves one core free.
"""

from __future__ import annotations

import os

import structlog
import torch

log = structlog.get_logger(__name__)


def default_threads(cores: int | None = None) -> int:
    """One intra-op thread per core but one (the event loop's), and at least one."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def configure_threads(requested: int | None, *, device: torch.device) -> int | None:
    """Set torch's intra-op threads for CPU inference (``requested``, else `default_threads`); ``None`` on a GPU."""
    if device.type != "cpu":
        return None
    threads = requested if requested is not None else default_threads()
    torch.set_num_threads(threads)
    log.info("torch.threads", intra_op=threads, requested=requested)
    return threads
