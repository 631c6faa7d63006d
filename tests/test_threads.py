"""Torch's CPU threads: one core left to the event loop, the operator's choice honoured, GPUs left alone."""

from __future__ import annotations

import pytest
import torch

from adapters.huggingface.threads import configure_threads, default_threads
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
