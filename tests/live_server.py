"""A real uvicorn server on a free loopback port, in a background thread, for SDK and CLI tests."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import uvicorn
from litestar import Litestar


def free_port() -> int:
    """A port nobody listens on now (for a server in another process; one in this process takes `listening_socket`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening_socket() -> tuple[socket.socket, int]:
    """A loopback socket already bound to a free port, and the port: no other process can take it in between."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, int(sock.getsockname()[1])


def start_in_thread(server: uvicorn.Server, sock: socket.socket) -> threading.Thread:
    """Run ``server`` on ``sock`` in a daemon thread."""
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def serve(app: Litestar, *, ready_timeout: float = 60.0) -> Iterator[str]:
    """Run ``app`` until the block ends; yields the base URL (``http://127.0.0.1:PORT``) once it listens."""
    sock, port = listening_socket()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = start_in_thread(server, sock)
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


def leave_once_generating(base: str, path: str, body: dict[str, object], produced: Callable[[], int]) -> None:
    """POST ``body`` to ``path`` and hang up once ``produced()`` says generation has begun (a client that leaves).

    A raw socket, so that leaving waits for the server however loaded the machine is: a client that gave up after a
    fixed time could leave before its request was even read, and test nothing of stopping a generation.
    """
    address = httpx.URL(base)
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {address.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    with socket.create_connection((address.host, address.port or 80)) as sock:
        sock.sendall(head.encode() + payload)
        deadline = time.monotonic() + 60  # only ends a failure
        while produced() == 0 and time.monotonic() < deadline:
            time.sleep(0.01)


def assert_counted_as_gone(base: str) -> None:
    """``/metrics`` at ``base`` comes to count a request with status 499 (client gone), and none with 500."""
    deadline = time.monotonic() + 10
    while 'status="499"' not in (metrics := httpx.get(f"{base}/metrics").text) and time.monotonic() < deadline:
        time.sleep(0.02)
    counted = [line for line in metrics.splitlines() if line.startswith("hf_openai_requests_total{")]
    assert any('status="499"' in line for line in counted), counted
    assert not any('status="500"' in line for line in counted), "a client leaving is not a server error"
