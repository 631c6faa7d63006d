"""What crosses the wire between the ingress and an engine replica: plain data, never our classes.

Generation steps go as dicts of ints, floats and strings; domain errors raised in a replica go as an error item in
the stream (or a result), so that the ingress raises the same error, and the client gets the same status, as a
single server would give.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from domain.errors import (
    ContextLengthExceededError,
    DomainError,
    GenerationError,
    InvalidRequestError,
    ModelNotReadyError,
    QueueFullError,
    UnknownModelError,
)
from domain.generation import FinishReason, GeneratedTokens, TokenLogprob

WireStep = dict[str, Any]
"""One item of a replica's stream: a step (``tokens``...) or an error (``error``)."""

ERRORS: dict[str, type[DomainError]] = {
    kind.__name__: kind
    for kind in (
        ContextLengthExceededError,
        InvalidRequestError,
        UnknownModelError,
        QueueFullError,
        ModelNotReadyError,
        GenerationError,
    )
}
"""The domain errors a replica reports by name; any other becomes a ``GenerationError``."""


class ReplicaUnavailableError(ModelNotReadyError):
    """No engine replica could finish the request: it died mid-way, or none is running (HTTP 503)."""

    code = "replica_unavailable"


def logprob_to_wire(logprob: TokenLogprob) -> list[Any]:
    """A token's log-probability as ``[id, logprob, [[id, logprob]...], rank]``."""
    return [logprob.token_id, logprob.logprob, [list(pair) for pair in logprob.top], logprob.rank]


def logprob_from_wire(item: list[Any]) -> TokenLogprob:
    """The inverse of ``logprob_to_wire``."""
    token_id, value, top, rank = item
    return TokenLogprob(int(token_id), float(value), tuple((int(t), float(v)) for t, v in top), rank)


def step_to_wire(step: GeneratedTokens) -> WireStep:
    """A generation step as plain data."""
    return {
        "tokens": list(step.token_ids),
        "finish": None if step.finish_reason is None else step.finish_reason.value,
        "logprobs": [logprob_to_wire(item) for item in step.logprobs],
        "cached": step.cached_tokens,
    }


def step_from_wire(item: Mapping[str, Any]) -> GeneratedTokens:
    """A generation step back from plain data; an error item raises the domain error it names."""
    if "error" in item:
        raise error_from_wire(item["error"])
    finish = item["finish"]
    return GeneratedTokens(
        token_ids=tuple(int(token) for token in item["tokens"]),
        finish_reason=None if finish is None else FinishReason(finish),
        logprobs=tuple(logprob_from_wire(entry) for entry in item["logprobs"]),
        cached_tokens=int(item["cached"]),
    )


def error_to_wire(error: DomainError) -> WireStep:
    """A domain error as an item of the stream."""
    return {"error": {"kind": type(error).__name__, "message": error.message, "param": error.param}}


def error_from_wire(error: Mapping[str, Any]) -> DomainError:
    """The domain error an error item names (a ``GenerationError`` when the name is not one of ``ERRORS``)."""
    kind = ERRORS.get(str(error.get("kind")), GenerationError)
    return kind(str(error.get("message", "the engine replica failed")), param=error.get("param"))
