"""What a crash or an outage must never leave behind: a half-written turn.

Every thread's messages are the system message then whole turns (user, assistant), its counters
agree with them, and each assistant message has its ledger row.
"""

from __future__ import annotations

from collections import Counter

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import Message, Thread, UsageRecord


async def assert_no_half_turns(sessions: async_sessionmaker[AsyncSession]) -> set[str]:
    """Check every thread; return the ids of all messages (to find acknowledged ones in)."""
    async with sessions() as session:
        threads = (await session.execute(select(Thread))).scalars().all()
        messages = (await session.execute(select(Message).order_by(Message.position))).scalars()
        ledger = Counter((await session.execute(select(UsageRecord.thread_id))).scalars())
    by_thread: dict[str, list[Message]] = {t.id: [] for t in threads}
    for message in messages.all():
        by_thread[message.thread_id].append(message)
    for thread in threads:
        log = by_thread[thread.id]
        roles = [m.role for m in log]
        num_turns = (len(log) - 1) // 2
        assert roles == ["system"] + ["user", "assistant"] * num_turns, (thread.id, roles)
        assert [m.position for m in log] == list(range(len(log))), thread.id
        assert thread.message_count == len(log), thread.id
        assert thread.token_count == sum(len(m.token_ids) for m in log), thread.id
        assert ledger[thread.id] == num_turns, (thread.id, ledger[thread.id], num_turns)
    return {m.id for log in by_thread.values() for m in log}
