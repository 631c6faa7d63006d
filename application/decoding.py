"""Incremental detokenization: turn a growing list of token ids into text deltas."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from domain.ports import Generator

_INCOMPLETE = "\ufffd"


@attrs.define
class IncrementalDecoder:
    """Releases text only once its bytes are complete, so a character split across tokens is never garbled.

    Each step decodes a short window of recent tokens twice (with and without the new ones) and emits the
    difference, as vLLM and ``TextIteratorStreamer`` do; decoding the window keeps the cost per token constant and
    keeps leading-space handling identical on both sides.
    """

    generator: Generator
    skip_special_tokens: bool = True
    token_ids: list[int] = attrs.field(factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0

    def push(self, new_ids: Sequence[int]) -> str:
        """Add ``new_ids`` and return the text that became certain."""
        self.token_ids.extend(new_ids)
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever text is still held back once generation has ended."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        window = self.token_ids[self._prefix_offset :]
        skip = self.skip_special_tokens
        prefix = self.generator.decode(window[: self._read_offset - self._prefix_offset], skip_special_tokens=skip)
        full = self.generator.decode(window, skip_special_tokens=skip)
        if len(full) <= len(prefix) or (full.endswith(_INCOMPLETE) and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self.token_ids)
        return full[len(prefix) :]
