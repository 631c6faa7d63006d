"""One place that turns every failure into OpenAI's error body."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import structlog
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException

from domain.errors import (
    DomainError,
    GenerationError,
    InvalidRequestError,
    ModelNotReadyError,
    QueueFullError,
    UnknownModelError,
)
from entrypoints.http.anthropic_wire import anthropic_error, speaks_anthropic
from entrypoints.http.openai_bodies import ErrorBody, ErrorInfo
from entrypoints.http.refusals import RefusalError
from entrypoints.http.wire import unstructure

log = structlog.get_logger(__name__)

RETRY_AFTER = {429: "1", 503: "5"}
"""Seconds a client should wait before retrying, by status: a batch slot frees quickly, a model loads slowly."""


def error_body(error: BaseException) -> tuple[int, ErrorBody]:  # noqa: PLR0911  one return per family
    """The HTTP status and OpenAI error body for ``error``."""
    if isinstance(error, InvalidRequestError):
        return 400, ErrorBody(ErrorInfo(error.message, "invalid_request_error", error.param, error.code))
    if isinstance(error, UnknownModelError):
        return 404, ErrorBody(ErrorInfo(error.message, "invalid_request_error", error.param, error.code))
    if isinstance(error, QueueFullError):
        return 429, ErrorBody(ErrorInfo(error.message, "rate_limit_exceeded", None, error.code))
    if isinstance(error, ModelNotReadyError):
        return 503, ErrorBody(ErrorInfo(error.message, "service_unavailable", None, error.code))
    if isinstance(error, RefusalError):
        return error.status, ErrorBody(ErrorInfo(error.message, error.type, None, error.code))
    if isinstance(error, GenerationError | DomainError):
        return 500, ErrorBody(ErrorInfo(error.message, "server_error", error.param, error.code))
    if isinstance(error, HTTPException):
        status = error.status_code
        kind = "invalid_request_error" if status < 500 else "server_error"  # noqa: PLR2004
        code = HTTPStatus(status).phrase.lower().replace(" ", "_")
        return status, ErrorBody(ErrorInfo(str(error.detail), kind, None, code))
    return 500, ErrorBody(ErrorInfo("The server had an error while processing your request.", "server_error"))


def handle_error(request: Request[Any, Any, Any], error: Exception) -> Response[Any]:
    """Exception handler for the whole app: OpenAI's body (Anthropic's on its routes), and a log line."""
    status, body = error_body(error)
    if isinstance(error, RefusalError):
        log.warning("request.refused", status=status, code=body.error.code)
    elif isinstance(error, ModelNotReadyError):  # expected while a model loads: no traceback
        log.warning("request.unavailable", status=status, code=body.error.code, error=body.error.message)
    elif status >= 500:  # noqa: PLR2004
        log.error("request.failed", status=status, exc_info=error)
    else:
        log.info("request.rejected", status=status, error=body.error.message, param=body.error.param)
    headers = {"Retry-After": RETRY_AFTER[status]} if status in RETRY_AFTER else None
    content = anthropic_error(status, body.error.message) if speaks_anthropic(request.url.path) else unstructure(body)
    return Response(content, status_code=status, media_type=MediaType.JSON, headers=headers)
