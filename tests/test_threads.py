"""Torch's CPU threads: one core left to the event loop, the operator's choice honoured, GPUs left alone, no idle
OpenMP team left behind by work outside the engine."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import structlog
import torch

from adapters.huggingface import loading
from adapters.huggingface.generator import HuggingFaceGenerator
from adapters.huggingface.threads import ThreadTuner, configure_threads, default_threads, on_own_thread
from entrypoints.http.__main__ import parse_settings
from tests.test_huggingface_generator import collect, greedy, tokens_of
from tests.tiny_model import build_tiny_model


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
"""One entry per thread of this process (Linux), named by its thread id."""


def _thread_ids() -> set[str]:
    return {task.name for task in TASKS.iterdir()}


def _parallel_work() -> set[str]:
    """Run an operation an OpenMP team of 2 shares; the ids of the process's threads while the team exists."""
    torch.set_num_threads(2)
    (torch.ones(1 << 22) + 1).sum()  # far above ATen's grain size
    return _thread_ids()


def _gone(threads: set[str]) -> bool:
    deadline = time.monotonic() + 10
    while threads & _thread_ids() and time.monotonic() < deadline:
        time.sleep(0.01)
    return not threads & _thread_ids()


@pytest.mark.skipif(not TASKS.is_dir(), reason="counts threads through Linux's /proc")
@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(), reason="the team is GNU OpenMP's")
def test_work_on_its_own_thread_leaves_no_openmp_team_behind():
    on_own_thread(_parallel_work, name="warm-up")  # what the first parallel region starts once for the process
    before = _thread_ids()
    started = on_own_thread(_parallel_work, name="passing") - before
    assert len(started) >= 2  # the thread and its team's worker
    assert _gone(started)

    worked, release = threading.Event(), threading.Event()
    seen: list[set[str]] = []

    def stay() -> None:
        seen.append(_parallel_work())
        worked.set()
        release.wait()

    staying = threading.Thread(target=stay)
    staying.start()
    try:  # the same work on a thread that stays keeps its team's worker too: what `on_own_thread` avoids
        assert worked.wait(10)
        time.sleep(0.2)
        assert len((seen[0] - before) & _thread_ids()) >= 2
    finally:
        release.set()
        staying.join()


def test_work_on_its_own_thread_returns_its_result_sees_the_context_and_raises_its_error(restore_threads):
    def fail() -> None:
        raise KeyError("boom")

    assert on_own_thread(torch.get_num_threads, name="counted", threads=1) == 1
    structlog.contextvars.bind_contextvars(request_id="req-1")
    try:
        assert on_own_thread(structlog.contextvars.get_contextvars, name="bound") == {"request_id": "req-1"}
    finally:
        structlog.contextvars.unbind_contextvars("request_id")
    with pytest.raises(KeyError, match="boom"):
        on_own_thread(fail, name="failing")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def test_the_plain_paths_work_runs_on_threads_that_end(model_dir):
    loaded = loading.load_model(str(model_dir), device="cpu")
    generator = HuggingFaceGenerator(loaded.model, loaded.tokenizer, model_id="tiny")
    seen: list[threading.Thread] = []
    loaded.model.register_forward_pre_hook(lambda *_: seen.append(threading.current_thread()))
    prompt = generator.encode("The cat eats an apple", add_special_tokens=True)
    try:
        tokens_of(collect(generator, prompt, greedy(max_new_tokens=2)))
        asyncio.run(generator.score(prompt, top=0))
    finally:
        generator.close()
    assert {thread.name for thread in seen} == {"generate"}
    assert len(set(seen)) == 2  # a thread for each job, so that no idle OpenMP team outlives it
    assert not any(thread.is_alive() for thread in seen)


def test_the_model_loads_on_a_thread_of_its_own(monkeypatch, model_dir):
    seen: list[threading.Thread] = []
    monkeypatch.setattr(loading, "prepare_linear_layers", lambda *_a, **_k: seen.append(threading.current_thread()))
    loading.load_model(str(model_dir), device="cpu")
    assert [thread.name for thread in seen] == ["load-model"]
    assert not seen[0].is_alive()
