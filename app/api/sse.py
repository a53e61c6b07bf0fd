"""Server-sent events for a streamed turn.

    event: delta            one per piece of text, in order; their texts add up to the reply
    data: {"text": "..."}

    event: done             last: the same body as the non-streaming answer
    data: {"thread_id": ..., "message": {...}, "usage": {...}, "cache": {...}}

    event: error            instead of done when the turn failed after streaming began
    data: {"error": {"type": ..., "message": ...}}   (nothing of the turn was saved)

The stream's ASGI response closes the turn when it ends however it ends (finished, client gone,
server stopping): an unfinished turn rolls back and the thread's lock is released at once, not
whenever the garbage collector finalizes the generator.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
from litestar import Request
from litestar.response import Stream
from litestar.types import Receive, Scope, Send

from app.api.errors import DATABASE_UNAVAILABLE
from app.db.outage import is_database_unavailable
from app.threads.errors import ThreadsError
from app.threads.schemas import TurnResult
from app.threads.turn import TextDelta, Turn, TurnDone

logger = logging.getLogger("app.api")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(event: str, data: Any) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


async def turn_events(turn: Turn) -> AsyncIterator[bytes]:
    try:
        async for event in turn.events():
            if isinstance(event, TextDelta):
                yield sse_event("delta", {"text": event.text})
            elif isinstance(event, TurnDone):
                yield sse_event("done", event.result)
    except ThreadsError as exc:
        yield sse_event("error", {"error": {"type": exc.type, "message": exc.message}})
    except Exception as exc:
        if is_database_unavailable(exc):
            logger.warning(
                "streamed turn on thread %s: database unavailable: %r", turn.thread_id, exc
            )
            error_type, message = DATABASE_UNAVAILABLE
        else:
            logger.exception("streamed turn on thread %s failed", turn.thread_id)
            error_type, message = "internal_error", "internal server error"
        yield sse_event("error", {"error": {"type": error_type, "message": message}})


async def replay_events(result: TurnResult) -> AsyncIterator[bytes]:
    if result.message.content:
        yield sse_event("delta", {"text": result.message.content})
    yield sse_event("done", result)


class EventStream(Stream):
    """A text/event-stream response that runs `on_close` once the response is over."""

    def __init__(
        self,
        events: AsyncIterator[bytes],
        *,
        on_close: Callable[[], Awaitable[None]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            events, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})}
        )
        self._on_close = on_close

    def to_asgi_response(self, app: Any, request: Request, **kwargs: Any) -> Any:
        inner = super().to_asgi_response(app, request, **kwargs)
        on_close = self._on_close
        if on_close is None:
            return inner

        async def respond(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await inner(scope, receive, send)
            finally:
                await on_close()

        return respond
