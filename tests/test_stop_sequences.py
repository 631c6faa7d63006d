"""The stop policy: where text ends, and how much of it is safe to release while streaming."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from adapters.stop_sequences import StopSequences

policy = StopSequences()
alphabet = st.sampled_from("ab\n😀")
texts = st.text(alphabet, max_size=30)
stops = st.lists(st.text(alphabet, min_size=1, max_size=5), min_size=1, max_size=3)


def test_server_wide_sequences_come_first_and_repeats_are_dropped() -> None:
    assert StopSequences(("END", "##")).sequences(["##", "", "STOP"]) == ("END", "##", "STOP")


def test_find_returns_the_earliest_start() -> None:
    assert policy.find("one STOP two END", ["END", "STOP"]) == 4
    assert policy.find("nothing here", ["END"]) is None


def test_safe_length_holds_back_a_partial_stop_sequence() -> None:
    assert policy.safe_length("hello ST", ["STOP"]) == len("hello ")
    assert policy.safe_length("hello S", ["STOP", "Sx"]) == len("hello ")
    assert policy.safe_length("hello", ["STOP"]) == len("hello")


@given(texts, stops)
def test_text_cut_at_find_never_contains_a_stop_sequence(text: str, sequences: list[str]) -> None:
    cut = policy.find(text, sequences)
    kept = text if cut is None else text[:cut]
    assert not any(s in kept for s in sequences)
    if cut is not None:
        assert any(text[cut:].startswith(s) for s in sequences)


@given(texts, stops, texts)
def test_released_prefix_is_never_part_of_a_later_stop(text: str, sequences: list[str], more: str) -> None:
    if policy.find(text, sequences) is not None:
        return
    released = policy.safe_length(text, sequences)
    full = text + more
    cut = policy.find(full, sequences)
    assert cut is None or cut >= released


@given(texts, stops)
def test_only_a_true_prefix_of_a_stop_is_held_back(text: str, sequences: list[str]) -> None:
    if policy.find(text, sequences) is not None:
        return
    held = text[policy.safe_length(text, sequences) :]
    assert held == "" or any(s.startswith(held) for s in sequences)
