"""Errors the core raises; the HTTP edge maps each to an OpenAI error body and status."""

from __future__ import annotations


class DomainError(Exception):
    """Base of every error the server reports to a client."""

    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(DomainError):
    """The request is malformed or asks for something impossible (HTTP 400)."""


class ContextLengthExceededError(InvalidRequestError):
    """Prompt plus requested tokens do not fit in the model's context window (HTTP 400)."""

    code = "context_length_exceeded"


class UnknownModelError(DomainError):
    """The request names a model this server does not serve (HTTP 404)."""

    code = "model_not_found"


class ModelNotReadyError(DomainError):
    """The model is still loading (HTTP 503)."""

    code = "model_not_ready"


class GenerationError(DomainError):
    """The generator failed while producing tokens (HTTP 500)."""


class QueueFullError(DomainError):
    """Every batch slot is taken and the waiting queue is full: try again shortly (HTTP 429)."""

    code = "queue_full"
