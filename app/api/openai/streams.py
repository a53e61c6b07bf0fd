"""Server-sent events of the OpenAI-shaped routes, as the SDK's typed streams read them.

Responses (`event: <type>`, data carries the same `type` and a `sequence_number`):

    response.created, response.in_progress          the response, status in_progress
    response.output_item.added                      the assistant message item, empty
    response.content_part.added                     its output_text part, empty
    response.output_text.delta ...                  the reply's text, piece by piece
    response.output_text.done, response.content_part.done, response.output_item.done
    response.completed (or response.incomplete)     the whole response, with usage
    error                                           instead, when the turn failed (nothing saved)

Chat Completions: `data: {chat.completion.chunk}` ... (the last with finish_reason; with
stream_options.include_usage one more with empty choices and the usage), then `data: [DONE]`.

The turn is closed before the last events go out (its lock released, an ephemeral thread
deleted, a failed one rolled back): a client that acts on the end of the stream finds the
server's state final. EventStream's on_close, which runs after the response, then has nothing
left to do (TurnRun.close runs once).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec

from app.api.errors import DATABASE_UNAVAILABLE
from app.db.outage import is_database_unavailable
from app.openai import schemas
from app.openai.chat import ChatRun, chat_usage
from app.openai.responses import ResponseRun, output_message, output_text
from app.openai.runs import TurnRun
from app.threads.errors import ThreadsError
from app.threads.turn import TextDelta, TurnDone

logger = logging.getLogger("app.api")


def _failure(exc: Exception) -> tuple[str, str]:
    if isinstance(exc, ThreadsError):
        return exc.type, exc.message
    if is_database_unavailable(exc):
        return DATABASE_UNAVAILABLE
    logger.exception("a streamed OpenAI-shaped turn failed")
    return "internal_error", "internal server error"


async def _settle(run: TurnRun) -> None:
    """Close the turn before the stream's last events; a failure to is logged, and the stream
    still ends as it would have."""
    try:
        await run.close()
    except Exception:
        logger.exception("closing a streamed OpenAI-shaped turn failed")


async def response_events(response: ResponseRun) -> AsyncIterator[bytes]:
    sequence = 0

    def event(kind: str, **data: Any) -> bytes:
        nonlocal sequence
        body = {"type": kind, "sequence_number": sequence, **data}
        sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(body) + b"\n\n"

    skeleton = response.skeleton
    item_id = response.reply_id
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    yield event("response.created", response=skeleton)
    yield event("response.in_progress", response=skeleton)
    yield event(
        "response.output_item.added",
        output_index=0,
        item=output_message(item_id, "", "in_progress"),
    )
    yield event("response.content_part.added", **where, part=output_text(""))
    done = None
    try:
        async for step in response.run.events():
            if isinstance(step, TextDelta):
                yield event("response.output_text.delta", **where, delta=step.text, logprobs=[])
            elif isinstance(step, TurnDone):
                done = response.finish(step.result)
    except Exception as exc:
        await _settle(response.run)
        code, message = _failure(exc)
        yield event("error", code=code, message=message, param=None)
        failed = msgspec.structs.replace(
            skeleton, status="failed", error=schemas.ResponseError(code=code, message=message)
        )
        yield event("response.failed", response=failed)
        return
    await _settle(response.run)
    if done is None:
        return
    reply = done.output[0]
    yield event("response.output_text.done", **where, text=reply.content[0].text, logprobs=[])
    yield event("response.content_part.done", **where, part=reply.content[0])
    yield event("response.output_item.done", output_index=0, item=reply)
    final = "response.incomplete" if done.status == "incomplete" else "response.completed"
    yield event(final, response=done)


async def chat_chunks(chat: ChatRun) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict[str, Any]], usage: schemas.ChatUsage | None = None) -> bytes:
        body: dict[str, Any] = {
            "id": chat.id,
            "object": "chat.completion.chunk",
            "created": chat.created,
            "model": chat.model,
            "choices": choices,
        }
        if chat.include_usage:
            body["usage"] = usage
        return b"data: " + msgspec.json.encode(body) + b"\n\n"

    def choice(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}

    yield chunk([choice({"role": "assistant", "content": ""})])
    result = None
    try:
        async for step in chat.run.events():
            if isinstance(step, TextDelta):
                yield chunk([choice({"content": step.text})])
            elif isinstance(step, TurnDone):
                result = step.result
    except Exception as exc:
        await _settle(chat.run)
        code, message = _failure(exc)
        error = {"message": message, "type": "server_error", "param": None, "code": code}
        yield b"data: " + msgspec.json.encode({"error": error}) + b"\n\n"
    else:
        await _settle(chat.run)
        if result is not None:
            yield chunk([choice({}, result.message.finish_reason)])
            if chat.include_usage:
                yield chunk([], chat_usage(result.usage))
    yield b"data: [DONE]\n\n"
