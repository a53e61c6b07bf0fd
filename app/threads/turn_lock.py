"""One turn at a time per thread, within a process and across processes sharing one database.

Within a process a set of thread ids rejects a second turn without touching the database. Across
processes each turn holds a Postgres session-level advisory lock, keyed by a stable 64-bit hash of
the thread id, on a connection it keeps for the whole turn. `pg_try_advisory_lock` never waits:
a lock held elsewhere means another process runs a turn, so the caller is told at once. If this
process dies, Postgres drops the connection and the lock with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from app.threads.errors import ThreadBusy
from app.threads.shield import run_to_completion

_TRY_LOCK = text("SELECT pg_try_advisory_lock(:key)")
_UNLOCK = text("SELECT pg_advisory_unlock(:key)")


def advisory_key(thread_id: str) -> int:
    """A signed 64-bit key (Postgres bigint), the same in every process and on every machine."""
    digest = hashlib.blake2b(b"kvthreads:turn:" + thread_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class TurnLocks:
    def __init__(self, db: AsyncEngine) -> None:
        self._db = db
        self._in_flight: set[str] = set()

    def is_in_flight(self, thread_id: str) -> bool:
        return thread_id in self._in_flight

    @asynccontextmanager
    async def hold(self, thread_id: str) -> AsyncIterator[AsyncConnection]:
        """Hold the thread's turn lock for the block, or raise ThreadBusy at once.

        Yields the connection that holds the lock, outside any transaction: the turn does its
        reads and its one write transaction on it (see `session_on`), so a turn never needs a
        second pooled connection while it holds one, and a full pool cannot deadlock turns.
        """
        if thread_id in self._in_flight:
            raise ThreadBusy(thread_id)
        self._in_flight.add(thread_id)
        try:
            async with self._db.connect() as conn:
                key = advisory_key(thread_id)
                locked = False

                async def try_lock() -> None:
                    nonlocal locked
                    locked = (await conn.execute(_TRY_LOCK, {"key": key})).scalar_one()
                    # The probe opened a transaction; end it so the connection does not sit
                    # "idle in transaction" for the turn. The session-level lock survives.
                    await conn.commit()

                try:
                    # Shielded, so that a cancellation cannot leave the lock taken but unknown.
                    await run_to_completion(try_lock())
                    if not locked:
                        raise ThreadBusy(thread_id)
                    yield conn
                finally:
                    if locked:
                        await _unlock(conn, key)
        finally:
            self._in_flight.discard(thread_id)


def session_on(conn: AsyncConnection) -> AsyncSession:
    """A session on the turn's own connection; use as `async with session_on(c) as s, s.begin()`
    (the connection must be outside a transaction, so that the session's commit is a real one)."""
    return AsyncSession(bind=conn, expire_on_commit=False)


async def _unlock(conn: AsyncConnection, key: int) -> None:
    if conn.invalidated:
        # The connection was lost (the database went down or stopped answering): its session and
        # the lock with it are gone; unlocking would only open a new connection to no purpose.
        return

    async def unlock() -> None:
        try:
            await conn.execute(_UNLOCK, {"key": key})
            await conn.commit()
        except Exception:
            # A connection whose unlock failed may still hold the lock: never hand it back to the
            # pool; closing it makes Postgres release the lock.
            await conn.invalidate()
            raise

    await run_to_completion(unlock())
