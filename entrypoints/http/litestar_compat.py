"""Where the server relies on Litestar's behaviour beyond its documented API, in one place.

Its canary in ``tests/test_compat.py`` fails clearly (a 500 counted) when Litestar changes how it reports a client
that left mid-body.
"""

from __future__ import annotations

from typing import Any

from litestar import Request
from litestar.exceptions import InternalServerException

from entrypoints.http.refusals import ClientDisconnectedError

CLIENT_LEFT_MID_BODY = "client disconnected prematurely"
"""What Litestar's ``Request.stream`` raises, as an ``InternalServerException``, when the body ends in a disconnect."""


async def request_body(request: Request[Any, Any, Any]) -> bytes:
    """The whole body; a client that left before sending it is gone (499), not a failure of the server (500)."""
    try:
        return await request.body()
    except InternalServerException as error:
        if error.detail == CLIENT_LEFT_MID_BODY:
            raise ClientDisconnectedError("the client closed the connection before sending its whole body") from error
        raise
