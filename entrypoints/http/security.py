"""Who may call the API: bearer API keys checked in constant time, CORS for browsers, a warning when left open."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

import attrs
import structlog
from litestar.config.cors import CORSConfig
from litestar.datastructures import Headers
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from entrypoints.http.refusals import InvalidAPIKeyError
from entrypoints.settings import ServerSettings

log = structlog.get_logger(__name__)

PROTECTED_PREFIXES = ("/v1", "/tokenize", "/detokenize")
"""Paths that need a key when keys are configured; ``/health``, ``/metrics`` and ``/docs`` stay open."""

MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer "
    "auth (i.e. Authorization: Bearer YOUR_KEY)."
)
WRONG_KEY = "Incorrect API key provided."


def is_protected(path: str) -> bool:
    """Whether ``path`` is under one of the protected prefixes."""
    return any(path == prefix or path.startswith(f"{prefix}/") for prefix in PROTECTED_PREFIXES)


def _as_bytes(keys: Iterable[str]) -> tuple[bytes, ...]:
    return tuple(key.encode() for key in keys)


@attrs.frozen
class APIKeys:
    """The configured keys; a presented key is compared with every one of them, in constant time."""

    keys: tuple[bytes, ...] = attrs.field(converter=_as_bytes, repr=False)

    def check(self, authorization: str | None) -> None:
        """Return if ``authorization`` is ``Bearer <a configured key>``; raise ``InvalidAPIKeyError`` otherwise."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidAPIKeyError(MISSING_KEY)
        presented = token.strip().encode()
        matched = False
        for key in self.keys:  # no early exit: the time taken says nothing about which key came close
            matched |= hmac.compare_digest(presented, key)
        if not matched:
            raise InvalidAPIKeyError(WRONG_KEY)


class APIKeyMiddleware(ASGIMiddleware):
    """Refuses protected paths without a valid ``Authorization: Bearer`` or ``x-api-key`` key; preflights pass."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, keys: APIKeys) -> None:
        self.keys = keys

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        """Check the key of a protected request, then pass it on."""
        path = scope.get("path_template") or scope["path"]  # the matched route, however the path was spelled
        if scope.get("method") != "OPTIONS" and is_protected(path):
            headers = Headers.from_scope(scope)
            key = headers.get("x-api-key")  # Anthropic's clients send the key so
            self.keys.check(headers.get("authorization") or (f"Bearer {key}" if key else None))
        await next_app(scope, receive, send)


def api_key_middleware(settings: ServerSettings) -> list[APIKeyMiddleware]:
    """The key check when keys are configured, else nothing."""
    return [APIKeyMiddleware(APIKeys(settings.api_keys))] if settings.api_keys else []


def cors_config(settings: ServerSettings) -> CORSConfig | None:
    """CORS for the ``--cors-origin`` origins; off when there are none."""
    if not settings.cors_origins:
        return None
    return CORSConfig(allow_origins=list(settings.cors_origins), allow_headers=["*"], allow_methods=["*"])


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(settings: ServerSettings) -> bool:
    """Log a WARNING when the API is open to everyone on the network; return whether it is."""
    exposed = not settings.api_keys and not is_loopback(settings.host)
    if exposed:
        log.warning(
            "server.unauthenticated",
            host=settings.host,
            hint="anyone who can reach this address may use the model; pass --api-key or HF_OPENAI_SERVER_API_KEY",
        )
    return exposed
