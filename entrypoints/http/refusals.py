"""Refusals of the server's operating policies: a wrong API key, a request over its time, a server shutting down.

They are not domain errors: the core knows nothing of keys, clocks or signals. Each carries the HTTP status and
the OpenAI ``type`` and ``code`` the error handler puts in the body.
"""

from __future__ import annotations


class RefusalError(Exception):
    """Base of the operating refusals; the message is what the client reads."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidAPIKeyError(RefusalError):
    """The ``Authorization`` header is missing or names no configured key (HTTP 401)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class RequestTimeoutError(RefusalError):
    """The request ran past ``--request-timeout``; its generation was stopped (HTTP 504)."""

    status = 504
    code = "request_timeout"


class ServerShuttingDownError(RefusalError):
    """The server is draining after a signal and this request could not finish in time (HTTP 503)."""

    status = 503
    type = "service_unavailable"
    code = "server_shutting_down"


class ClientDisconnectedError(RefusalError):
    """The client went away before the answer was ready; nobody reads this answer (nginx's 499)."""

    status = 499
    type = "invalid_request_error"
    code = "client_closed_request"

    def __init__(self, message: str = "the client closed the connection before the answer was ready") -> None:
        super().__init__(message)
