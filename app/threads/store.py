"""The queries of the threads service, on one AsyncSession each (the caller owns the transaction).

Every read of a thread is scoped to its account: another account's thread reads as missing.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import models


async def get_thread(
    session: AsyncSession, account_id: str, thread_id: str, *, for_update: bool = False
) -> models.Thread | None:
    query = select(models.Thread).where(
        models.Thread.id == thread_id, models.Thread.account_id == account_id
    )
    if for_update:
        query = query.with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def list_threads(
    session: AsyncSession, account_id: str, *, limit: int, before: tuple[datetime, str] | None
) -> list[models.Thread]:
    """Newest first; `before` is the (created_at, id) of the previous page's last thread."""
    query = select(models.Thread).where(models.Thread.account_id == account_id)
    if before is not None:
        query = query.where(tuple_(models.Thread.created_at, models.Thread.id) < tuple_(*before))
    query = query.order_by(models.Thread.created_at.desc(), models.Thread.id.desc()).limit(limit)
    return list((await session.execute(query)).scalars())


async def list_messages(
    session: AsyncSession, thread_id: str, *, limit: int, after_position: int
) -> list[models.Message]:
    query = (
        select(models.Message)
        .where(models.Message.thread_id == thread_id, models.Message.position > after_position)
        .order_by(models.Message.position)
        .limit(limit)
    )
    return list((await session.execute(query)).scalars())


async def token_log(session: AsyncSession, thread_id: str) -> list[int]:
    """The thread's exact token log: its messages' token ids, concatenated in order."""
    query = (
        select(models.Message.token_ids)
        .where(models.Message.thread_id == thread_id)
        .order_by(models.Message.position)
    )
    log: list[int] = []
    for token_ids in (await session.execute(query)).scalars():
        log.extend(token_ids)
    return log


async def delete_thread(session: AsyncSession, account_id: str, thread_id: str) -> bool:
    result = await session.execute(
        delete(models.Thread).where(
            models.Thread.id == thread_id, models.Thread.account_id == account_id
        )
    )
    return result.rowcount > 0


async def find_usage_by_idempotency_key(
    session: AsyncSession, account_id: str, key: str
) -> models.UsageRecord | None:
    query = select(models.UsageRecord).where(
        models.UsageRecord.account_id == account_id, models.UsageRecord.idempotency_key == key
    )
    return (await session.execute(query)).scalar_one_or_none()


def touch(thread: models.Thread) -> None:
    """Mark the thread updated now (the database's clock, like created_at)."""
    thread.updated_at = func.now()
