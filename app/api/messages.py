"""/v1/threads/{id}/messages and /tokens: append a message (one turn), read the log."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import HeaderParameter, JSONBody

from app.api.disconnect import ClientDisconnected, unless_disconnected
from app.api.errors import error_response
from app.api.sse import EventStream, replay_events, turn_events
from app.api.threads import After, PageLimit, ThreadId
from app.threads import schemas
from app.threads.service import ThreadService
from app.threads.turn import Replayed, Turn, TurnDone, TurnService

REPLAYED_HEADER = "Idempotent-Replayed"
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        description="a retry with the same key returns the first result without running again",
    ),
]


class MessageController(Controller):
    path = "/threads/{thread_id:str}"
    tags = ["messages"]

    @post("/messages", operation_id="appendMessage", status_code=200)
    async def append_message(
        self,
        request: Request,
        account_id: NamedDependency[str],
        turn_service: NamedDependency[TurnService],
        thread_id: ThreadId,
        data: JSONBody[schemas.AppendMessageRequest],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[schemas.TurnResult]:
        """Append a user message and generate the reply: one atomic turn.

        With `stream: true` the answer is server-sent events (`delta`..., then `done` carrying
        this same body, or `error`).
        """
        outcome = await turn_service.begin(account_id, thread_id, data, idempotency_key)
        if isinstance(outcome, Replayed):
            headers = {REPLAYED_HEADER: "true"}
            if data.stream:
                return EventStream(replay_events(outcome.result), headers=headers)
            return Response(outcome.result, headers=headers)
        if data.stream:
            return EventStream(turn_events(outcome), on_close=outcome.close)
        try:
            result = await unless_disconnected(request.receive, lambda: _run(outcome))
        except ClientDisconnected:
            # Nobody reads this; it keeps the access log honest (nginx's "client closed").
            return error_response(499, "client_closed", "the client went away; nothing saved")
        return Response(result)

    @get("/messages", operation_id="listMessages")
    async def list_messages(
        self,
        account_id: NamedDependency[str],
        thread_service: NamedDependency[ThreadService],
        thread_id: ThreadId,
        limit: PageLimit = 50,
        after: After = None,
    ) -> schemas.MessageList:
        """The thread's messages, oldest first (position 0 is the system message)."""
        return await thread_service.messages(account_id, thread_id, limit=limit, after=after)

    @get("/tokens", operation_id="getThreadTokens")
    async def get_tokens(
        self,
        account_id: NamedDependency[str],
        thread_service: NamedDependency[ThreadService],
        thread_id: ThreadId,
    ) -> schemas.TokenLog:
        """The thread's exact token log: every message's token ids, concatenated in order."""
        return await thread_service.tokens(account_id, thread_id)


async def _run(turn: Turn) -> schemas.TurnResult:
    try:
        async for event in turn.events():
            if isinstance(event, TurnDone):
                return event.result
        raise RuntimeError("the turn ended without a result")
    finally:
        await turn.close()
