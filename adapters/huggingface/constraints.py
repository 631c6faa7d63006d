"""Grammar-constrained decoding with llguidance: JSON Schemas and tool-call grammars as a logits processor."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import attrs
import llguidance
import llguidance.hf
import torch
from llguidance import LLMatcher, LLTokenizer
from transformers import LogitsProcessor

from domain.errors import InvalidRequestError
from domain.generation import OutputConstraint

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""How constrained JSON is written: one line, with the separators ``json.dumps`` uses (no runaway whitespace)."""

CACHE_SIZE = 128
"""Compiled grammars kept per generator, keyed by the constraint's JSON."""

_SHIFTS = torch.arange(32, dtype=torch.int32)

V = TypeVar("V")


def constraint_key(constraint: OutputConstraint) -> str:
    """The cache key of a constraint: its JSON, keys sorted."""
    return json.dumps(attrs.asdict(constraint), sort_keys=True, default=str)


def grammar_of(constraint: OutputConstraint) -> str:
    """The llguidance grammar of ``constraint`` (not yet validated); ``ValueError`` when it cannot be written.

    Plain JSON is one schema, a regex one regex, a grammar its own (GBNF converted to Lark); wrapped JSON (tool
    calls), choices and alternatives are Lark grammars around the same pieces.
    """
    if constraint.alternative is None and constraint.wrapper is None:
        if constraint.regex is not None:
            return LLMatcher.grammar_from_regex(constraint.regex)
        if constraint.grammar is not None:
            return llguidance.grammar_from("grammar", constraint.grammar)
        if constraint.choices is None:
            return LLMatcher.grammar_from_json_schema(_styled(constraint))
    if constraint.alternative is None:
        rules = _lark_rules(constraint, "start")
    else:
        rules = [
            "start: main | alternative",
            *_lark_rules(attrs.evolve(constraint, alternative=None), "main"),
            *_lark_rules(constraint.alternative, "alternative"),
        ]
    return LLMatcher.grammar_from_lark("\n".join(rules))


def _styled(constraint: OutputConstraint) -> dict[str, object]:
    schema = dict(constraint.json_schema) if constraint.json_schema is not None else {"type": "object"}
    return schema | {"x-guidance": JSON_STYLE}


def _lark_rules(constraint: OutputConstraint, name: str) -> list[str]:
    """Lark rules defining ``name`` as the output ``constraint`` allows (a grammar of its own cannot be nested)."""
    if constraint.alternative is not None or constraint.grammar is not None:
        msg = "a grammar cannot be combined with another constraint"
        raise ValueError(msg)
    if constraint.regex is not None:
        body = "/" + constraint.regex.replace("/", "\\/") + "/"
    elif constraint.choices is not None:
        body = " | ".join(json.dumps(choice) for choice in constraint.choices) or '""'
    else:
        body = f"%json {json.dumps(_styled(constraint))}"
    if constraint.wrapper is None:
        return [f"{name}: {body}"]
    opening, closing = constraint.wrapper
    more = f' ("\\n" {name}_item)*' if constraint.repeat else ""
    return [
        f"{name}: {name}_item{more}",
        f"{name}_item: {json.dumps(opening)} {name}_value {json.dumps(closing)}",
        f"{name}_value: {body}",
    ]


@attrs.define
class GrammarCompiler:
    """Compiles output constraints into llguidance matchers for one tokenizer (the ``ConstraintChecker`` port).

    The llguidance view of the vocabulary is built once, on first use; grammars and matchers are cached by the
    constraint's JSON, and each generation works on a copy of the cached matcher.
    """

    tokenizer: PreTrainedTokenizerBase
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _vocabulary: LLTokenizer | None = attrs.field(init=False, default=None)
    _grammars: OrderedDict[str, str] = attrs.field(init=False, factory=OrderedDict)
    _matchers: OrderedDict[str, LLMatcher] = attrs.field(init=False, factory=OrderedDict)

    def check(self, constraint: OutputConstraint) -> None:
        """Raise ``InvalidRequestError`` naming ``constraint.param`` when its schema cannot be compiled."""
        self._grammar(constraint)

    def processor(self, constraint: OutputConstraint) -> GrammarLogitsProcessor:
        """A fresh logits processor enforcing ``constraint`` for one generation (compiled on its first step)."""
        return GrammarLogitsProcessor(lambda: self.matcher(constraint))

    def matcher(self, constraint: OutputConstraint) -> LLMatcher:
        """A matcher at the start of ``constraint``'s grammar, ready to consume tokens."""
        key = constraint_key(constraint)
        with self._lock:
            cached = self._matchers.get(key)
            if cached is not None:
                self._matchers.move_to_end(key)
        if cached is None:
            cached = LLMatcher(self._tokenizer(), self._grammar(constraint), log_level=0)
            if cached.is_error():
                raise _unenforceable(constraint, cached.get_error())
            with self._lock:
                _remember(self._matchers, key, cached)
        return cached.deep_copy()

    def _grammar(self, constraint: OutputConstraint) -> str:
        key = constraint_key(constraint)
        with self._lock:
            cached = self._grammars.get(key)
        if cached is not None:
            return cached
        try:
            grammar = grammar_of(constraint)
            problem = LLMatcher.validate_grammar(grammar)
        except ValueError as error:
            raise _unenforceable(constraint, str(error)) from error
        if problem:
            raise _unenforceable(constraint, problem)
        with self._lock:
            _remember(self._grammars, key, grammar)
        return grammar

    def _tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._vocabulary is None:
                try:
                    self._vocabulary = llguidance.hf.from_tokenizer(
                        self.tokenizer,  # type: ignore[arg-type]
                        n_vocab=max(self.vocab_size, len(self.tokenizer)),
                        eos_token=list(self.eos_token_ids),
                    )
                except ValueError as error:
                    msg = f"constrained output needs a fast tokenizer: {error}"
                    raise InvalidRequestError(msg) from error
            return self._vocabulary


def _remember(cache: OrderedDict[str, V], key: str, value: V) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > CACHE_SIZE:
        cache.popitem(last=False)


def _unenforceable(constraint: OutputConstraint, problem: str) -> InvalidRequestError:
    detail = problem.strip().splitlines()[0] if problem.strip() else "unknown error"
    msg = f"{constraint.param}: the schema cannot be enforced: {detail}"
    return InvalidRequestError(msg, param=constraint.param)


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks, row by row, every token the grammar does not allow next; end-of-sequence only once it is complete.

    Each row's matcher is found from the tokens the row generated, so rows may be reordered or forked between steps
    (beam search): a row continues its parent's matcher (copied when several rows share it), or replays its tokens.
    """

    def __init__(self, new_matcher: Callable[[], LLMatcher]) -> None:
        self._new_matcher = new_matcher
        self._prompt_length: int | None = None
        self._states: dict[tuple[int, ...], LLMatcher] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """Keep the allowed tokens' scores, set the others to ``-inf``."""
        if self._prompt_length is None:
            self._prompt_length = input_ids.shape[1]
        rows = [tuple(ids) for ids in input_ids[:, self._prompt_length :].tolist()]
        self._states = self._advance(dict.fromkeys(rows))
        width = scores.shape[-1]
        allowed = torch.stack([self._allowed(self._states[row], width) for row in rows]).to(scores.device)
        masked = scores.masked_fill(~allowed, float("-inf"))
        stuck = torch.isneginf(masked).all(dim=-1)
        if stuck.any():  # another processor banned every token the grammar allows: the grammar wins
            masked[stuck] = torch.zeros_like(masked[stuck]).masked_fill(~allowed[stuck], float("-inf"))
        return masked  # type: ignore[return-value]

    def _advance(self, rows: dict[tuple[int, ...], None]) -> dict[tuple[int, ...], LLMatcher]:
        """The matcher of every distinct row, each having consumed the row's latest token."""
        children: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        for row in rows:
            children.setdefault(row[:-1], []).append(row)
        states: dict[tuple[int, ...], LLMatcher] = {}
        for parent_key, keys in children.items():
            parent = self._states.get(parent_key) if keys[0] else None
            if parent is None:
                for key in keys:
                    states[key] = matcher = self._new_matcher()
                    if key:
                        matcher.consume_tokens(list(key))
                continue
            matchers = [parent, *(parent.deep_copy() for _ in keys[1:])]
            for key, matcher in zip(keys, matchers, strict=True):
                matcher.consume_token(key[-1])
                states[key] = matcher
        return states

    def _allowed(self, matcher: LLMatcher, width: int) -> torch.Tensor:
        """Which of ``width`` token ids may come next (llguidance allows only end-of-sequence once a matcher failed)."""
        words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
        bits = ((words.unsqueeze(1) >> _SHIFTS) & 1).reshape(-1).bool()
        allowed = torch.zeros(width, dtype=torch.bool)
        size = min(width, bits.shape[0])
        allowed[:size] = bits[:size]
        return allowed
