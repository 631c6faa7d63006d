"""The one table of generation options a request may name: type, range, other names, how the engine runs each.

Every dialect reads its request's options through this table, so an option's range is checked once, in one place,
with one message style ("`top_k` must be >= 0, got -1."), and its published schema says the same.

Adding a HuggingFace ``GenerationConfig`` option that needs no code of its own is one row here: it is checked,
published in the OpenAPI schema and handed to ``GenerationConfig`` by name. An option with a meaning of its own
(vLLM's ``ignore_eos``) is a row here and the code that gives it that meaning in the generator adapter.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping

import attrs

from domain.errors import InvalidRequestError


class Kind(enum.StrEnum):
    """The JSON type an option takes."""

    INTEGER = "integer"
    NUMBER = "number"
    BOOLEAN = "boolean"
    EARLY_STOPPING = "boolean or 'never'"
    TOKEN_SEQUENCES = "array of arrays of token ids"  # noqa: S105  a type's name


@attrs.frozen(kw_only=True)
class Option:
    """One generation option: its JSON type, its range, the other names clients send it under, and its meaning."""

    name: str
    kind: Kind
    doc: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    """``low`` itself is outside the range."""
    aliases: tuple[str, ...] = ()
    """Other names a client may send it under (another server's name for the same thing)."""
    sampling: bool = False
    """It only matters when sampling: a greedy request may carry it (OpenAI clients do) and it is then ignored."""
    neutral: object = None
    """A value that changes nothing; with ``batched=False``, any other value takes the request out of the batch."""
    batched: bool = True
    """The batching engine decodes requests that set it (beam search and guidance need ``generate``'s own loop)."""
    declared: bool = False
    """A field of ``GenerationParams`` that each dialect declares itself (``option_field``), never read from the
    request's other fields: a dialect without it (Anthropic's has no ``presence_penalty``) does not offer it."""

    @property
    def requirement(self) -> str:
        """The range in words: ``>= 0``, ``in (0, 1]``, ``finite``."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.open_low else '['}{_number(self.low)}, {_number(self.high)}]"
        if self.low is not None:
            return f"{'>' if self.open_low else '>='} {_number(self.low)}"
        if self.high is not None:
            return f"<= {_number(self.high)}"
        return "finite"

    def check(self, value: object, *, sent_as: str | None = None) -> object:
        """``value`` as the option's type (an integer number is a number), or an ``InvalidRequestError``.

        The error names the field as the client sent it (``sent_as``: an alias) in the message and as its ``param``.
        """
        problem = self._problem(value)
        if problem is not None:
            name = sent_as or self.name
            shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:37]}..."  # noqa: PLR2004
            msg = f"`{name}` {problem}, got {shown}."
            raise InvalidRequestError(msg, param=name)
        if self.kind is Kind.TOKEN_SEQUENCES:
            return tuple(tuple(item) for item in value)  # type: ignore[attr-defined]
        return float(value) if self.kind is Kind.NUMBER else value  # type: ignore[arg-type]

    def _problem(self, value: object) -> str | None:
        """What is wrong with ``value`` (``must be ...``), or ``None``."""
        if self.kind is Kind.TOKEN_SEQUENCES:
            return _token_sequences_problem(value)
        if self.kind in (Kind.BOOLEAN, Kind.EARLY_STOPPING):
            fits = isinstance(value, bool) or (self.kind is Kind.EARLY_STOPPING and value == "never")
            return None if fits else f"must be a {self.kind}"
        numbers = int if self.kind is Kind.INTEGER else int | float
        if isinstance(value, bool) or not isinstance(value, numbers):
            return f"must be {'an integer' if self.kind is Kind.INTEGER else 'a number'}"
        return None if self.holds(value) else f"must be {self.requirement}"

    def holds(self, value: float) -> bool:
        """Whether the number ``value`` is in the option's range (and finite)."""
        if isinstance(value, float) and not math.isfinite(value):
            return False
        below = self.low is not None and (value <= self.low if self.open_low else value < self.low)
        above = self.high is not None and value > self.high
        return not (below or above)

    def schema(self) -> dict[str, object]:
        """The option's JSON schema: type, range and description."""
        schema: dict[str, object] = {"description": self.doc}
        if self.kind is Kind.TOKEN_SEQUENCES:
            return schema | {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}}
        if self.kind is Kind.EARLY_STOPPING:
            return schema | {"oneOf": [{"type": "boolean"}, {"type": "string", "enum": ["never"]}]}
        schema["type"] = str(self.kind)
        if self.low is not None:
            schema["exclusiveMinimum" if self.open_low else "minimum"] = self.low
        if self.high is not None:
            schema["maximum"] = self.high
        return schema


def _token_sequences_problem(value: object) -> str | None:
    if not isinstance(value, list | tuple) or not all(isinstance(item, list | tuple) and item for item in value):
        return "must be a list of non-empty lists of token ids"
    ids = [token for item in value for token in item]
    if not all(isinstance(token, int) and not isinstance(token, bool) and token >= 0 for token in ids):
        return "must hold token ids (integers >= 0)"
    return None


def _number(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() and abs(bound) < 2**53 else str(bound)


MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
"""OpenAI's ``seed`` is a signed 64-bit integer."""

OPTIONS: tuple[Option, ...] = (
    # OpenAI's sampling options: the dialects declare these fields themselves, with this table's range.
    Option(
        name="temperature", declared=True, kind=Kind.NUMBER, low=0, doc="0 is greedy decoding; higher is more random"
    ),
    Option(
        name="top_p",
        declared=True,
        kind=Kind.NUMBER,
        low=0,
        high=1,
        sampling=True,
        doc="nucleus sampling's probability mass",
    ),
    Option(
        name="presence_penalty",
        declared=True,
        kind=Kind.NUMBER,
        low=-2,
        high=2,
        doc="subtracted once per token already used",
    ),
    Option(
        name="frequency_penalty", declared=True, kind=Kind.NUMBER, low=-2, high=2, doc="subtracted per use of a token"
    ),
    Option(
        name="seed",
        declared=True,
        kind=Kind.INTEGER,
        low=MIN_SEED,
        high=MAX_SEED,
        doc="seeds sampling: same seed, same text",
    ),
    # HuggingFace GenerationConfig's options, read from the request's other fields (the OpenAI SDK's extra_body).
    Option(name="top_k", kind=Kind.INTEGER, low=0, sampling=True, doc="sample among the k likeliest (0: off)"),
    Option(name="typical_p", kind=Kind.NUMBER, low=0, high=1, open_low=True, sampling=True, doc="typical sampling"),
    Option(name="min_p", kind=Kind.NUMBER, low=0, high=1, sampling=True, doc="drop tokens below min_p x the top one"),
    Option(
        name="epsilon_cutoff", kind=Kind.NUMBER, low=0, high=1, sampling=True, doc="drop tokens below this probability"
    ),
    Option(name="eta_cutoff", kind=Kind.NUMBER, low=0, high=1, sampling=True, doc="eta sampling's cutoff"),
    Option(name="repetition_penalty", kind=Kind.NUMBER, low=0, open_low=True, doc="divides repeated tokens' logits"),
    Option(name="no_repeat_ngram_size", kind=Kind.INTEGER, low=0, doc="no n-gram of this size occurs twice"),
    Option(name="encoder_no_repeat_ngram_size", kind=Kind.INTEGER, low=0, doc="no n-gram of the prompt recurs"),
    Option(name="bad_words_ids", kind=Kind.TOKEN_SEQUENCES, doc="token sequences never generated"),
    Option(name="min_length", kind=Kind.INTEGER, low=0, doc="least length of prompt and output together"),
    Option(
        name="min_new_tokens",
        kind=Kind.INTEGER,
        low=0,
        aliases=("min_tokens",),
        doc="least tokens generated before end-of-sequence may end the output (vLLM: min_tokens)",
    ),
    Option(name="num_beams", kind=Kind.INTEGER, low=1, neutral=1, batched=False, doc="beam search's beams"),
    Option(name="num_beam_groups", kind=Kind.INTEGER, low=1, neutral=1, batched=False, doc="diverse beam groups"),
    Option(name="diversity_penalty", kind=Kind.NUMBER, low=0, neutral=0.0, batched=False, doc="between beam groups"),
    Option(name="length_penalty", kind=Kind.NUMBER, doc="beam search's length exponent"),
    Option(name="early_stopping", kind=Kind.EARLY_STOPPING, doc="when beam search stops"),
    Option(name="guidance_scale", kind=Kind.NUMBER, low=0, neutral=1.0, batched=False, doc="classifier-free guidance"),
    Option(name="do_sample", kind=Kind.BOOLEAN, doc="sample (true) or decode greedily (false)"),
    # vLLM's options with a meaning of their own.
    Option(name="ignore_eos", kind=Kind.BOOLEAN, doc="keep generating past end-of-sequence, up to max_tokens (vLLM)"),
)

_BY_NAME = {name: option for option in OPTIONS for name in (option.name, *option.aliases)}
_READ = {name: option for name, option in _BY_NAME.items() if not option.declared}

OPTION_NAMES = frozenset(_READ)
"""Every name the table reads from a request's other fields: the options' own names and their aliases."""


def option(name: str) -> Option:
    """The table's row for ``name`` (an option's own name or an alias)."""
    return _BY_NAME[name]


def read_options(fields: Mapping[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """Split a request's fields into the table's options (checked, under their own names) and the others.

    An explicit ``null`` leaves an option unset. Sending an option under two of its names is refused.
    """
    options: dict[str, object] = {}
    others: dict[str, object] = {}
    for name, value in fields.items():
        row = _READ.get(name)
        if row is None:
            others[name] = value
        elif value is not None:
            if row.name in options:
                msg = f"`{row.name}` was sent under two names; send one (its names: {', '.join(_names(row))})."
                raise InvalidRequestError(msg, param=name)
            options[row.name] = row.check(value, sent_as=name)
    return options, others


def _names(row: Option) -> tuple[str, ...]:
    return (row.name, *row.aliases)


def unbatched(options: Mapping[str, object]) -> list[str]:
    """The options in ``options`` set to something only ``generate``'s own loop runs (beams, guidance)."""
    rows = ((_BY_NAME.get(name), value) for name, value in options.items())
    return [row.name for row, value in rows if row is not None and not row.batched and value != row.neutral]
