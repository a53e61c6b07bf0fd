"""Run a non-streaming turn only while its client is still there.

A plain JSON response is sent after the turn is committed; a client that leaves before that
should not be billed for a reply it never gets. The request body is read by then, so the next
ASGI message is the disconnect; watching for it cancels the turn (which then commits nothing).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from litestar.types import Receive

T = TypeVar("T")


class ClientDisconnected(Exception):
    pass


async def unless_disconnected(receive: Receive, work: Callable[[], Awaitable[T]]) -> T:
    outcome: list[T] = []
    failure: list[Exception] = []

    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    group.cancel_scope.cancel()
                    return

        group.start_soon(watch)
        try:
            outcome.append(await work())
        except Exception as exc:  # raised below as itself, not wrapped in an ExceptionGroup
            failure.append(exc)
        group.cancel_scope.cancel()  # done: stop watching
    if failure:
        raise failure[0]
    if not outcome:
        raise ClientDisconnected
    return outcome[0]
