"""Threads: create, list, read, delete, and read their messages and token logs.

The turn itself (append a message, generate, commit) is app/threads/turn.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db import ids, models
from app.threads import fork, schemas, store
from app.threads.cursor import decode_cursor, encode_cursor
from app.threads.errors import ThreadNotFound
from app.threads.ports import ModelRuntime
from app.threads.text import reject_nul
from app.threads.turn_lock import TurnLocks, session_on
from app.threads.views import message_view, thread_detail, thread_view

MAX_PAGE = 100
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class ThreadService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        runtime: ModelRuntime,
        locks: TurnLocks,
    ) -> None:
        self._sessions = sessions
        self._runtime = runtime
        self._locks = locks

    async def create(self, account_id: str, request: schemas.CreateThreadRequest) -> schemas.Thread:
        reject_nul("system", request.system)
        for key, value in request.metadata.items():
            reject_nul("metadata", key)
            reject_nul(f"metadata[{key!r}]", value)
        # Position 0 opens the token log: the chat format's start (BOS, the system message).
        start_ids = self._runtime.chat_format.start(request.system)
        thread = models.Thread(
            id=ids.new_id(ids.THREAD),
            account_id=account_id,
            model=self._runtime.name,
            system_prompt=request.system,
            metadata_=dict(request.metadata),
            token_count=len(start_ids),
            message_count=1,
        )
        opening = models.Message(
            id=ids.new_id(ids.MESSAGE),
            thread_id=thread.id,
            position=0,
            role="system",
            content=request.system or "",
            token_ids=start_ids,
        )
        async with self._sessions.begin() as session:
            session.add(thread)
            await session.flush()  # the thread row first: the message refers to it
            session.add(opening)
        return thread_view(thread)

    async def list(self, account_id: str, *, limit: int, after: str | None) -> schemas.ThreadList:
        before = None
        if after is not None:
            micros, thread_id = decode_cursor(after, (int, str))
            before = (_EPOCH + micros * _MICROSECOND, thread_id)
        async with self._sessions() as session:
            rows = await store.list_threads(session, account_id, limit=limit + 1, before=before)
        has_more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = (
            encode_cursor((rows[-1].created_at - _EPOCH) // _MICROSECOND, rows[-1].id)
            if has_more
            else None
        )
        return schemas.ThreadList(
            data=[thread_view(r) for r in rows], has_more=has_more, next_cursor=next_cursor
        )

    async def get(self, account_id: str, thread_id: str) -> schemas.ThreadDetail:
        async with self._sessions() as session:
            row = await store.get_thread(session, account_id, thread_id)
        if row is None:
            raise ThreadNotFound(thread_id)
        return thread_detail(row, self._runtime.engine.thread_state(thread_id))

    async def fork(
        self, account_id: str, thread_id: str, request: schemas.ForkThreadRequest
    ) -> schemas.ThreadDetail:
        """A new thread with the first messages of this one, sharing their KV (app/threads/fork.py)."""
        row = await fork.fork_thread(self._sessions, self._runtime, account_id, thread_id, request)
        return thread_detail(row, self._runtime.engine.thread_state(row.id))

    async def rewind(
        self, account_id: str, thread_id: str, request: schemas.RewindThreadRequest
    ) -> schemas.ThreadDetail:
        """Drop the messages after a position, keeping the KV of the rest (app/threads/fork.py)."""
        async with self._sessions() as session:  # 404 before 409: another account's is missing
            if await store.get_thread(session, account_id, thread_id) is None:
                raise ThreadNotFound(thread_id)
        row = await fork.rewind_thread(
            self._locks, self._runtime, account_id, thread_id, request.position
        )
        return thread_detail(row, self._runtime.engine.thread_state(thread_id))

    async def delete(self, account_id: str, thread_id: str) -> schemas.Deleted:
        async with self._sessions() as session:
            if await store.get_thread(session, account_id, thread_id) is None:
                raise ThreadNotFound(thread_id)
        # Under the turn lock: a thread is not deleted under a turn in flight (409 instead).
        async with self._locks.hold(thread_id) as conn:
            async with session_on(conn) as session, session.begin():
                if not await store.delete_thread(session, account_id, thread_id):
                    raise ThreadNotFound(thread_id)
            self._runtime.engine.forget_thread(thread_id)
        return schemas.Deleted(id=thread_id)

    async def messages(
        self, account_id: str, thread_id: str, *, limit: int, after: str | None
    ) -> schemas.MessageList:
        after_position = -1 if after is None else decode_cursor(after, (int,))[0]
        async with self._sessions() as session:
            if await store.get_thread(session, account_id, thread_id) is None:
                raise ThreadNotFound(thread_id)
            rows = await store.list_messages(
                session, thread_id, limit=limit + 1, after_position=after_position
            )
        has_more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].position) if has_more else None
        return schemas.MessageList(
            data=[message_view(r) for r in rows], has_more=has_more, next_cursor=next_cursor
        )

    async def tokens(self, account_id: str, thread_id: str) -> schemas.TokenLog:
        async with self._sessions() as session:
            if await store.get_thread(session, account_id, thread_id) is None:
                raise ThreadNotFound(thread_id)
            log = await store.token_log(session, thread_id)
        return schemas.TokenLog(thread_id=thread_id, token_ids=log)
