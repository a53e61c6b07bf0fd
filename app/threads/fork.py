"""Fork a thread at a message, or rewind it to one; both keep the KV of what they keep.

    fork(thread, at=3)      messages 0..3 copied (exact token ids) into a new thread of the same
                            account; the engine gives it the parent's KV blocks of that log
                            (full blocks shared, a partial last block copied): nothing computed
    rewind(thread, 3)       messages 4.. deleted, counters follow; the engine cuts the thread's
                            KV back to the remaining log (a shared partial block copied first)

Rewind runs under the thread's turn lock (409 while a turn runs, here or in another process)
and commits before the engine cuts the KV, so the KV never holds tokens the database lost track
of: at worst it holds more, which the next turn's prefix match drops. Fork reads the parent's
messages in one statement, so it sees whole turns only, and needs no lock. Billed turns stay in
the ledger either way.
"""

from __future__ import annotations

import logging

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import ids, models
from app.threads import schemas, store
from app.threads.errors import InvalidField, ThreadNotFound
from app.threads.ports import ModelRuntime
from app.threads.text import reject_nul
from app.threads.turn_lock import TurnLocks, session_on

log = logging.getLogger(__name__)


async def fork_thread(
    sessions: async_sessionmaker[AsyncSession],
    runtime: ModelRuntime,
    account_id: str,
    thread_id: str,
    request: schemas.ForkThreadRequest,
) -> models.Thread:
    for key, value in (request.metadata or {}).items():
        reject_nul("metadata", key)
        reject_nul(f"metadata[{key!r}]", value)
    async with sessions.begin() as session:
        parent = await store.get_thread(session, account_id, thread_id)
        if parent is None:
            raise ThreadNotFound(thread_id)
        query = select(models.Message).where(models.Message.thread_id == thread_id)
        if request.at is not None:
            query = query.where(models.Message.position <= request.at)
        kept = list((await session.execute(query.order_by(models.Message.position))).scalars())
        if request.at is not None and (not kept or kept[-1].position != request.at):
            raise InvalidField(
                "at", f"thread {thread_id!r} has no message at position {request.at}"
            )
        child = models.Thread(
            id=ids.new_id(ids.THREAD),
            account_id=account_id,
            model=parent.model,
            system_prompt=parent.system_prompt,
            metadata_=dict(parent.metadata_ if request.metadata is None else request.metadata),
            token_count=sum(len(m.token_ids) for m in kept),
            message_count=len(kept),
        )
        session.add(child)
        await session.flush()  # the thread row first: the messages refer to it
        session.add_all(
            models.Message(
                id=ids.new_id(ids.MESSAGE),
                thread_id=child.id,
                position=m.position,
                role=m.role,
                content=m.content,
                token_ids=list(m.token_ids),
            )
            for m in kept
        )
    child_log = [t for m in kept for t in m.token_ids]
    try:
        await runtime.engine.fork_thread(thread_id, child.id, child_log)
    except Exception:  # the child recomputes (or finds shared blocks) on its first turn
        log.exception("engine fork of %s into %s failed", thread_id, child.id)
    return child


async def rewind_thread(
    locks: TurnLocks, runtime: ModelRuntime, account_id: str, thread_id: str, position: int
) -> models.Thread:
    async with locks.hold(thread_id) as conn:
        async with session_on(conn) as session, session.begin():
            thread = await store.get_thread(session, account_id, thread_id, for_update=True)
            if thread is None:
                raise ThreadNotFound(thread_id)
            if position >= thread.message_count:
                raise InvalidField(
                    "position",
                    f"thread {thread_id!r} has {thread.message_count} messages "
                    f"(positions 0 to {thread.message_count - 1})",
                )
            await session.execute(
                delete(models.Message).where(
                    models.Message.thread_id == thread_id, models.Message.position > position
                )
            )
            token_log = await store.token_log(session, thread_id)
            thread.token_count = len(token_log)
            thread.message_count = position + 1
            store.touch(thread)
            await session.flush()
            await session.refresh(thread)
        try:
            await runtime.engine.rewind_thread(thread_id, token_log)
        except Exception:  # the next turn's prefix match drops what the log no longer has
            log.exception("engine rewind of %s failed", thread_id)
    return thread
