"""Failures the user can cause or fix (server down, wrong URL, rejected request), as one readable line."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import openai

EXPECTED_ERRORS: tuple[type[Exception], ...] = (openai.OpenAIError, httpx.HTTPError, httpx.InvalidURL)
"""What the client reports in one line instead of a traceback."""


def describe_error(error: BaseException, url: str) -> str:
    """One line saying what went wrong talking to ``url``."""
    if isinstance(error, openai.APIStatusError):
        return f"{error.status_code} {_api_message(error.body, error.message)}{_url_hint(error.status_code, url)}"
    if isinstance(error, openai.APIConnectionError | httpx.TransportError):
        return f"cannot reach {url}: {connection_failure(error)}"
    if isinstance(error, openai.APIError):  # an error event in the middle of a stream
        return _api_message(error.body, error.message)
    return str(error) or type(error).__name__


def connection_failure(error: BaseException) -> str:
    """Why a connection failed, in a few words, from the exceptions behind ``error``."""
    causes = list(_causes(error))
    if any(isinstance(cause, TimeoutError | httpx.TimeoutException | openai.APITimeoutError) for cause in causes):
        return "timed out"
    if any(isinstance(cause, ConnectionRefusedError) for cause in causes):
        return "connection refused"
    if any(isinstance(cause, socket.gaierror) for cause in causes):
        return "unknown host"
    innermost = causes[-1]
    return str(innermost) or type(innermost).__name__


def _causes(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _api_message(body: object, fallback: str) -> str:
    """``type: message`` from an OpenAI error body (the SDK hands over its ``error`` member)."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            kind = inner.get("type")
            return f"{kind}: {inner['message']}" if kind else str(inner["message"])
    return fallback


def _url_hint(status: int, url: str) -> str:
    not_found = 404
    return f" (is --url {url} the server's OpenAI base URL, ending in /v1?)" if status == not_found else ""
