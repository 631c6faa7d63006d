"""Torch's CPU threads: one core left to the event loop, the operator's choice honoured, GPUs left alone, no idle
OpenMP team left behind by work outside the engine."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from adapters.huggingface.threads import ThreadTuner, configure_threads, default_threads, on_own_thread
from entrypoints.http.__main__ import parse_settings


@pytest.mark.parametrize(("cores", "threads"), [(1, 1), (2, 1), (8, 7)])
def test_one_core_is_left_to_the_event_loop(cores, threads):
    assert default_threads(cores) == threads


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_the_requested_count_is_set_on_the_cpu(restore_threads):
    assert configure_threads(1, device=torch.device("cpu")) == 1
    assert torch.get_num_threads() == 1


def test_without_a_request_the_default_applies(restore_threads):
    assert configure_threads(None, device=torch.device("cpu")) == default_threads()


def test_a_gpu_is_left_alone(restore_threads):
    before = torch.get_num_threads()
    assert configure_threads(1, device=torch.device("cuda")) is None
    assert torch.get_num_threads() == before


def test_the_threads_flag_reaches_the_settings():
    assert parse_settings(["--threads", "3"]).threads == 3
    assert parse_settings([]).threads is None
    with pytest.raises(SystemExit):
        parse_settings(["--threads", "0"])


# ThreadTuner: the batching engine's thread count, measured rather than guessed


def drive(tuner: ThreadTuner, seconds: dict[int, float], passes: int, key: str = "decode") -> list[int]:
    """Run ``passes`` passes of one kind where each count takes ``seconds[count]``; return the counts picked."""
    picked = []
    for _ in range(passes):
        threads = tuner.pick(key)
        tuner.record(key, threads, seconds[threads])
        picked.append(threads)
    return picked


def test_each_count_is_tried_then_the_faster_one_kept():
    tuner = ThreadTuner((1, 2), explore_every=1000)
    picked = drive(tuner, {1: 0.09, 2: 0.06}, 50)
    assert picked[:6] == [1, 1, 1, 2, 2, 2]
    assert set(picked[6:]) == {2}
    assert tuner.best("decode") == 2


def test_a_machine_that_becomes_busy_is_noticed_and_the_other_count_taken():
    tuner = ThreadTuner((1, 2), explore_every=16, burst=3)
    drive(tuner, {1: 0.09, 2: 0.06}, 40)
    assert tuner.best("decode") == 2
    picked = drive(tuner, {1: 0.09, 2: 0.28}, 40)  # another process now holds a core: two threads collapse
    assert tuner.best("decode") == 1
    assert picked[-16:].count(1) >= 16 - 3  # one burst of exploring per 16 passes
    drive(tuner, {1: 0.09, 2: 0.06}, 16)  # and it leaves again: one burst of trying two threads notices
    assert tuner.best("decode") == 2


def test_the_pass_after_a_switch_is_not_counted():
    tuner = ThreadTuner((1, 2), explore_every=1000, burst=2)
    first = tuner.pick("decode")
    tuner.record("decode", first, 100.0)  # the first pass: threads were parked, not a fair time
    second = tuner.pick("decode")
    tuner.record("decode", second, 0.09)
    assert tuner.best("decode") == first
    drive(tuner, {1: 0.09, 2: 0.06}, 4)
    assert tuner.best("decode") == 2


def test_kinds_of_work_are_tuned_apart():
    tuner = ThreadTuner((1, 2), explore_every=1000)
    drive(tuner, {1: 0.09, 2: 0.06}, 20, key="prefill")
    drive(tuner, {1: 0.05, 2: 0.07}, 20, key="decode")
    assert (tuner.best("prefill"), tuner.best("decode")) == (2, 1)


def test_a_fixed_count_is_never_changed():
    tuner = ThreadTuner.for_cpu(3, cores=8)
    assert drive(tuner, {3: 1.0}, 10) == [3] * 10


@pytest.mark.parametrize(("cores", "choices"), [(1, (1,)), (2, (1, 2)), (16, (15, 16))])
def test_by_default_the_tuner_weighs_every_core_against_all_but_one(cores, choices):
    assert ThreadTuner.for_cpu(None, cores=cores).choices == choices


def test_tuner_settings_are_checked():
    with pytest.raises(ValueError, match="choices"):
        ThreadTuner(())
    with pytest.raises(ValueError, match="choices"):
        ThreadTuner((1, 2), burst=1)


def test_a_sudden_slowdown_is_noticed_before_the_next_scheduled_try():
    tuner = ThreadTuner((1, 2), explore_every=10_000, burst=3)
    drive(tuner, {1: 0.09, 2: 0.06}, 20)
    assert tuner.best("decode") == 2
    drive(tuner, {1: 0.09, 2: 0.28}, 10)  # another process takes a core: two threads now 4-5x slower
    assert tuner.best("decode") == 1
    drive(tuner, {1: 0.092, 2: 0.06}, 100)  # a slow drift of a few percent does not trigger a try
    assert tuner.best("decode") == 1


TASKS = Path("/proc/self/task")
"""One entry per thread of this process (Linux)."""


def _threads_of_this_process() -> int:
    return sum(1 for _ in TASKS.iterdir())


def _settles_at(expected: int) -> bool:
    deadline = time.monotonic() + 10
    while _threads_of_this_process() != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return _threads_of_this_process() == expected


def _parallel_work() -> str:
    torch.set_num_threads(2)
    (torch.ones(1 << 22) + 1).sum()  # far above ATen's grain size: an OpenMP team of 2 threads runs it
    return threading.current_thread().name


@pytest.mark.skipif(not TASKS.is_dir(), reason="counts threads through Linux's /proc")
@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(), reason="the team is GNU OpenMP's")
def test_work_on_its_own_thread_leaves_no_openmp_team_behind():
    before = _threads_of_this_process()
    assert on_own_thread(_parallel_work, name="passing") == "passing"
    assert _settles_at(before)  # the thread and its team's worker are gone

    release = threading.Event()
    staying = threading.Thread(target=lambda: (_parallel_work(), release.wait()))
    staying.start()
    try:  # the same work on a thread that stays keeps its team's worker too: what `on_own_thread` avoids
        assert not _settles_at(before + 1)
    finally:
        release.set()
        staying.join()


def test_work_on_its_own_thread_returns_its_result_and_raises_its_error(restore_threads):
    def fail() -> None:
        raise KeyError("boom")

    assert on_own_thread(torch.get_num_threads, name="counted", threads=1) == 1
    with pytest.raises(KeyError, match="boom"):
        on_own_thread(fail, name="failing")
