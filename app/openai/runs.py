"""A turn started for an OpenAI-shaped route, and what happens once it is over.

    run = TurnRun(turn_or_replayed, after=[delete_ephemeral_thread])
    async for event in run.events(): ...      # TextDelta ..., TurnDone (as app/threads/turn.py)
    await run.close()                          # the turn's close, then `after` (shielded)

Ephemeral threads carry a Chat Completions call or a `store: false` response: created for one
turn and deleted after it (their ledger rows stay, with thread_id NULL).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.threads import schemas as thread_schemas
from app.threads import store
from app.threads.errors import ThreadNotFound
from app.threads.service import ThreadService
from app.threads.shield import run_to_completion
from app.threads.turn import Replayed, TextDelta, Turn, TurnDone

log = logging.getLogger(__name__)

EPHEMERAL_KEY = "kvthreads.ephemeral"  # metadata of an ephemeral thread: what it carries


@dataclass
class TurnRun:
    outcome: Turn | Replayed
    after: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _closed: bool = False

    @property
    def replayed(self) -> bool:
        return isinstance(self.outcome, Replayed)

    async def events(self) -> AsyncIterator[TextDelta | TurnDone]:
        if isinstance(self.outcome, Replayed):
            if self.outcome.result.message.content:
                yield TextDelta(self.outcome.result.message.content)
            yield TurnDone(self.outcome.result)
            return
        async for event in self.outcome.events():
            yield event

    async def result(self) -> thread_schemas.TurnResult:
        try:
            async for event in self.events():
                if isinstance(event, TurnDone):
                    return event.result
            raise RuntimeError("the turn ended without a result")
        finally:
            await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await run_to_completion(self._close())

    async def _close(self) -> None:
        try:
            if isinstance(self.outcome, Turn):
                await self.outcome.close()
        finally:
            for step in self.after:
                await step()


async def key_was_used(
    sessions: async_sessionmaker[AsyncSession], account_id: str, key: str | None
) -> bool:
    """Whether a turn already ran with this Idempotency-Key: then `TurnService.begin` answers
    from the ledger (a replay, or 422 for another request) before it looks at the thread, and
    no thread (a new one, a fork, an ephemeral one) must be made for the retry."""
    if key is None:
        return False
    async with sessions() as session:
        return await store.find_usage_by_idempotency_key(session, account_id, key) is not None


REPLAY_THREAD = "thr_replay"  # the thread id handed to begin for a replay; never looked up


async def new_ephemeral_thread(
    threads: ThreadService, account_id: str, system: str | None, kind: str
) -> str:
    thread = await threads.create(
        account_id,
        thread_schemas.CreateThreadRequest(system=system, metadata={EPHEMERAL_KEY: kind}),
    )
    return thread.id


def deleter(threads: ThreadService, account_id: str, thread_id: str) -> Callable[[], Awaitable]:
    async def delete() -> None:
        try:
            await threads.delete(account_id, thread_id)
        except ThreadNotFound:
            pass
        except Exception:  # marked ephemeral in its metadata: an operator can find it
            log.exception("could not delete ephemeral thread %s", thread_id)

    return delete
