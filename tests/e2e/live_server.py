"""A real uvicorn server on a free port, in a thread with its own event loop.

For what the in-process test client cannot show: a client that closes its connection mid-stream.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from litestar import Litestar

from tests.ports import free_port


class LiveServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.url = f"http://{config.host}:{config.port}"


@contextmanager
def live_server(
    app: Litestar, *, start_timeout_s: float = 30.0, graceful_shutdown_s: float | None = None
) -> Iterator[LiveServer]:
    """Serve `app`; `server.should_exit = True` stops it early, as Ctrl-C does."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=graceful_shutdown_s,
    )
    server = LiveServer(config)
    thread = threading.Thread(target=server.run, name="live-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the live server did not start")
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
