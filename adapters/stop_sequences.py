"""Stop sequences matched on generated text, so multi-token sequences stop as reliably as single tokens."""

from __future__ import annotations

from collections.abc import Sequence

import attrs


@attrs.frozen
class StopSequences:
    """The ``StopPolicy``: server-wide sequences merged with each request's own."""

    server_wide: tuple[str, ...] = ()

    def sequences(self, requested: Sequence[str]) -> tuple[str, ...]:
        """Server-wide then requested sequences, empty strings and repeats dropped, order kept."""
        return tuple(dict.fromkeys(s for s in (*self.server_wide, *requested) if s))

    def find(self, text: str, sequences: Sequence[str]) -> int | None:
        """Index where the earliest stop sequence starts in ``text``, or ``None``."""
        hits = [index for s in sequences if (index := text.find(s)) != -1]
        return min(hits, default=None)

    def safe_length(self, text: str, sequences: Sequence[str]) -> int:
        """Length of the prefix of ``text`` that no continuation can turn into a stop sequence."""
        held = 0
        for sequence in sequences:
            for size in range(min(len(sequence) - 1, len(text)), held, -1):
                if text.endswith(sequence[:size]):
                    held = size
                    break
        return len(text) - held
