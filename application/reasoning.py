"""Reasoning models: the thinking they write between ``<think>`` and ``</think>`` is kept out of the answer's text.

SmolLM3, Qwen3 and DeepSeek-R1 think first, then answer. Their templates either let the model open the block itself or
open it in the prompt (the prompt then ends with ``<think>``); either way the thinking is split off as it streams,
so clients get it apart from the answer (``reasoning_content``, a ``reasoning`` item, a ``thinking`` block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import attrs

from domain.generation import Choice, CompletionStream, TextDelta

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def opens_thinking(prompt: str) -> bool:
    """Whether the prompt ends inside a thinking block the template opened, so the model's text starts as thinking."""
    return prompt.rstrip().endswith(THINK_OPEN)


@attrs.define
class ReasoningSplitter:
    """Splits one choice's streamed text into thinking and answer.

    A choice thinks when the prompt opened a block (``thinking``) or its text starts with ``<think>``; the thinking
    ends at ``</think>`` (or with the text, when the token budget ran out first). Text that may be the start of
    either tag is held back until it is known; whitespace between the thinking and the answer is dropped.
    """

    thinking: bool = False
    reasoning: str = ""
    answer: str = ""
    thought: bool = False
    """Whether a thinking block was seen: only then is the answer's leading whitespace dropped."""
    _pending: str = ""
    _decided: bool = False
    _answering: bool = False

    def __attrs_post_init__(self) -> None:
        self._decided = self.thought = self.thinking

    def push(self, text: str) -> tuple[str, str]:
        """Add streamed text; return the (thinking, answer) text that became certain."""
        self._pending += text
        return self._drain(final=False)

    def flush(self) -> tuple[str, str]:
        """Whatever is still held back, now that the text is complete."""
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> tuple[str, str]:
        if not self._decided:
            begun = self._pending.lstrip()
            if not final and (not begun or (len(begun) < len(THINK_OPEN) and THINK_OPEN.startswith(begun))):
                return "", ""
            self._decided = True
            if begun.startswith(THINK_OPEN):
                self.thinking = self.thought = True
                self._pending = begun[len(THINK_OPEN) :]
        thought = ""
        if self.thinking:
            end = self._pending.find(THINK_CLOSE)
            if end < 0:
                keep = 0 if final else _partial_suffix(self._pending, THINK_CLOSE)
                cut = len(self._pending) - keep
                thought, self._pending = self._pending[:cut], self._pending[cut:]
                self.reasoning += thought
                return thought, ""
            thought, self._pending = self._pending[:end], self._pending[end + len(THINK_CLOSE) :]
            self.reasoning += thought
            self.thinking = False
        if self.thought and not self._answering:
            self._pending = self._pending.lstrip()
            if not self._pending and not final:
                return thought, ""
        self._answering = True
        answer, self._pending = self._pending, ""
        self.answer += answer
        return thought, answer


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag``."""
    return next((size for size in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:size])), 0)


async def split_reasoning(
    events: CompletionStream, *, thinking: bool, count_tokens: Callable[[str], int]
) -> CompletionStream:
    """``events`` with each choice's thinking moved from its text to ``reasoning``, on deltas, choices and usage.

    ``thinking`` says the prompt opened a thinking block. The completion's ``reasoning_tokens`` counts the tokens
    of all thinking text (re-encoded, so at most each choice's completion tokens).
    """
    splitters: dict[int, ReasoningSplitter] = {}
    finished: dict[int, Choice] = {}
    async with contextlib.aclosing(events):
        async for event in events:
            if isinstance(event, TextDelta):
                splitter = splitters.setdefault(event.index, ReasoningSplitter(thinking))
                thought, answer = splitter.push(event.text)
                yield attrs.evolve(event, text=answer, reasoning=thought)
            elif isinstance(event, Choice):
                splitter = splitters.setdefault(event.index, ReasoningSplitter(thinking))
                thought, answer = splitter.flush()
                if thought or answer:
                    yield TextDelta(answer, event.index, reasoning=thought)
                answered = splitter.answer if splitter.thought else event.text
                choice = attrs.evolve(event, text=answered, reasoning=splitter.reasoning)
                finished[event.index] = choice
                yield choice
            else:
                choices = tuple(finished.get(c.index, c) for c in event.choices)
                spent = sum(min(count_tokens(c.reasoning), c.completion_tokens) for c in choices if c.reasoning)
                yield attrs.evolve(event, choices=choices, usage=attrs.evolve(event.usage, reasoning_tokens=spent))
