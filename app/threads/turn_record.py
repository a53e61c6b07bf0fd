"""The one transaction of a turn: its two messages, the thread's counters and its ledger row.

    recorder = TurnRecorder(model="builtin-tiny-random", chat_format=fmt, prices=source.current)
    result = await recorder.record(turn, finish)    # on the turn's locked connection

All of it is committed together, or none of it (invariant 4). The caller then tells the engine to
keep the turn's KV, or to roll it back when this raised (app/threads/turn.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import msgspec
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.billing.ledger import TurnTokens, usage_row
from app.billing.prices import PriceBook, UnitPrices
from app.db import ids, models
from app.engine.runtime.types import FinishEvent
from app.threads import schemas, store
from app.threads.errors import GenerationFailed, IdempotencyConflict, ThreadNotFound
from app.threads.ports import ChatFormat
from app.threads.text import storable
from app.threads.turn_lock import session_on
from app.threads.views import turn_result_view


class Turn(Protocol):
    """What the recorder reads of a turn (app/threads/turn.py's Turn), so that the two modules
    do not import each other."""

    account_id: str
    thread_id: str
    request: schemas.AppendMessageRequest
    history_ids: list[int]
    new_ids: list[int]
    idempotency_key: str | None
    fingerprint: str
    conn: AsyncConnection  # holds the thread's lock
    extras: Any  # app/threads/turn.py's TurnExtras: reply_id, on_record


class TurnRecorder:
    def __init__(
        self, model: str, chat_format: ChatFormat, prices: Callable[[], PriceBook]
    ) -> None:
        self._model = model
        self._chat_format = chat_format
        self._prices = prices  # called per turn: a price edit applies from the next turn

    async def record(self, turn: Turn, finish: FinishEvent) -> schemas.TurnResult:
        generated = list(finish.token_ids)
        reply_ids = generated + self._chat_format.assistant_end(generated, finish.finish_reason)
        unit = self._prices().for_model(self._model)
        try:
            async with session_on(turn.conn) as session, session.begin():
                thread = await _unchanged_thread(session, turn)
                user, reply = _messages(thread, turn, finish, reply_ids)
                session.add_all([user, reply])
                thread.token_count += len(turn.new_ids) + len(reply_ids)
                thread.message_count += 2
                store.touch(thread)
                await session.flush()  # gives the messages their created_at
                usage = self._usage_row(turn, finish, unit)
                result = turn_result_view(reply, finish.finish_reason, usage)
                # Kept for a retry with the same Idempotency-Key to replay (JSON null without one).
                usage.response = (
                    None
                    if turn.idempotency_key is None
                    else {"request_sha256": turn.fingerprint, "body": msgspec.to_builtins(result)}
                )
                session.add(usage)
                if turn.extras.on_record is not None:
                    await session.flush()
                    await turn.extras.on_record(session, result)
        except IntegrityError as exc:
            if turn.idempotency_key is not None and "idempotency_key" in str(exc.orig):
                raise IdempotencyConflict(turn.idempotency_key) from None
            raise
        return result

    def _usage_row(self, turn: Turn, finish: FinishEvent, unit: UnitPrices) -> models.UsageRecord:
        counts = finish.counts
        tokens = TurnTokens(
            input_tokens=counts.prompt_tokens,
            cached_tokens=counts.cached_tokens,
            fresh_tokens=counts.computed_tokens,
            output_tokens=counts.generated_tokens,
            shared_tokens=counts.shared_tokens,
        )
        return usage_row(
            turn.account_id,
            turn.thread_id,
            self._model,
            unit,
            tokens,
            miss_reason=None if counts.miss_reason is None else counts.miss_reason.value,
            timings=finish.timings,
            idempotency_key=turn.idempotency_key,
            cache_tier=getattr(counts, "cache_tier", None),
        )


async def _unchanged_thread(session: AsyncSession, turn: Turn) -> models.Thread:
    """The turn's thread, locked for update, with the token log the turn was generated from."""
    thread = await store.get_thread(session, turn.account_id, turn.thread_id, for_update=True)
    if thread is None:
        raise ThreadNotFound(turn.thread_id)
    if thread.token_count != len(turn.history_ids):
        # Cannot happen under the turn lock; refuse rather than corrupt the log.
        raise GenerationFailed("the thread changed while the turn ran")
    return thread


def _messages(
    thread: models.Thread, turn: Turn, finish: FinishEvent, reply_ids: list[int]
) -> tuple[models.Message, models.Message]:
    """The turn's user message and the assistant's reply, at the end of the thread."""
    position = thread.message_count
    user = models.Message(
        id=ids.new_id(ids.MESSAGE),
        thread_id=thread.id,
        position=position,
        role="user",
        content=turn.request.content,
        token_ids=list(turn.new_ids),
    )
    reply = models.Message(
        id=turn.extras.reply_id or ids.new_id(ids.MESSAGE),
        thread_id=thread.id,
        position=position + 1,
        role="assistant",
        content=storable(finish.text),
        token_ids=reply_ids,
    )
    return user, reply
