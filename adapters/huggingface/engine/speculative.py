"""Prompt-lookup speculation: guess a row's next tokens from its own text, and check the guesses in one pass.

An answer that quotes its prompt (an edited passage, a refactored function, a JSON document filled from the
question) repeats long runs of tokens already seen. The last few tokens are looked up earlier in the prompt and the
output, and the tokens that followed there become a draft; the engine feeds the row's last token and the draft in
one forward pass and keeps the draft's tokens as long as each equals the token the row would have picked anyway
(its own processors, argmax or its own random generator, one token at a time), plus the first token that differs.
No second model, and the output is the one decoding without speculation gives: only the number of forward passes
changes. A pass over a few more positions costs a CPU little more than a pass over one, since reading the weights
dominates.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

NGRAM_SIZES = (3, 2)
"""The lengths of the tail looked up, longest first: a longer match predicts better.

A single token (",", "the") recurs everywhere and what followed it once rarely follows again: on free answers
one-token matches were accepted about one time in eight, and their rejected drafts made decoding slower.
"""


def propose(tokens: Sequence[int], count: int, *, ngrams: Sequence[int] = NGRAM_SIZES) -> list[int]:
    """Up to ``count`` tokens that followed an earlier occurrence of ``tokens``' last n tokens.

    The longest ``n`` (of ``ngrams``) that occurs earlier wins; of its occurrences, the latest that ``count`` tokens
    follow, else the earliest (the most that follow: in a run of repeats the latest is followed by one token).
    An empty list when there is none or ``count`` is 0.
    """
    length = len(tokens)
    if count <= 0:
        return []
    for size in ngrams:
        if length <= size:
            continue
        tail = list(tokens[length - size :])
        last = tail[-1]
        earliest = None
        for end in range(length - 2, size - 2, -1):  # ``end``: where an earlier occurrence's last token is
            if tokens[end] == last and list(tokens[end - size + 1 : end + 1]) == tail:
                if length - 1 - end >= count:
                    return list(tokens[end + 1 : end + 1 + count])
                earliest = end
        if earliest is not None:
            return list(tokens[earliest + 1 :])
    return []


@attrs.frozen
class Speculation:
    """How far the engine guesses ahead: ``tokens`` per row at most, ``positions`` per verifying pass at most.

    A pass over ``rows x (1 + draft)`` positions costs little more than one over ``rows`` while reading the weights
    dominates; past a few dozen positions the arithmetic does, and guesses that fail cost real time, so a big batch
    drafts shorter (``positions // rows - 1`` tokens), and not at all once that is 0. ``tokens=0`` turns it off.
    """

    tokens: int = 0
    positions: int = 32

    def __attrs_post_init__(self) -> None:
        if self.tokens < 0 or self.positions < 1:
            msg = f"speculative tokens must be >= 0 and positions >= 1, got {self}"
            raise ValueError(msg)

    def draft_length(self, rows: int) -> int:
        """The longest draft a row of a batch of ``rows`` may get."""
        return max(0, min(self.tokens, self.positions // max(rows, 1) - 1))


@attrs.define
class DraftCounts:
    """Draft tokens the engine proposed and those it kept, since it started (what ``/metrics`` reports)."""

    proposed: int = 0
    accepted: int = 0

    def totals(self) -> tuple[int, int]:
        """(proposed, accepted)."""
        return self.proposed, self.accepted

    def record(self, proposed: int, accepted: int) -> None:
        """Count one row's verified draft."""
        self.proposed += proposed
        self.accepted += accepted


LONGEST_PAUSE = 32
"""The most decoding steps a row waits before drafting again (`pause_after`)."""


def pause_after(misses: int) -> int:
    """How many steps a row skips drafting after ``misses`` drafts in a row of which no token was kept: 2, 4, 8...

    A verifying pass costs a batch several one-token steps' arithmetic (four rows of five positions took 2.6 times
    a four-row step of SmolLM2 in int8), so a free answer whose lookups keep failing (stories, explanations) made
    speculation cost 10-28% at four streams; an answer that quotes its prompt has most of its drafts kept and rarely
    pauses. One kept token ends the pauses.
    """
    return min(2**misses, LONGEST_PAUSE) if misses > 0 else 0


__all__ = ["LONGEST_PAUSE", "NGRAM_SIZES", "DraftCounts", "Speculation", "pause_after", "propose"]
