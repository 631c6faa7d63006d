"""A real uvicorn server on a free loopback port, in a background thread, for SDK and CLI tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn
from litestar import Litestar


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve(app: Litestar, *, ready_timeout: float = 60.0) -> Iterator[str]:
    """Run ``app`` until the block ends; yields the base URL (``http://127.0.0.1:PORT``) once it listens."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            msg = "the test server did not start"
            raise RuntimeError(msg)
        time.sleep(0.02)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def wait_ready(base: str, timeout: float = 120.0) -> None:
    """Poll ``/health`` until the model is loaded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        time.sleep(0.1)
    msg = "the server never became ready"
    raise RuntimeError(msg)
