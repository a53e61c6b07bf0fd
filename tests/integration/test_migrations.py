"""The Alembic revisions and the SQLAlchemy models describe the same schema, up and down."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, pool, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from app.db import migrate
from app.db.models import Account, Base, Message, Thread, UsageRecord

TABLES = {
    "accounts",
    "api_keys",
    "billing_sessions",
    "threads",
    "messages",
    "usage_ledger",
    "responses",
}


def _diff(sync_conn) -> list:
    context = MigrationContext.configure(
        sync_conn, opts={"compare_type": True, "compare_server_default": True}
    )
    return compare_metadata(context, Base.metadata)


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def test_upgrade_downgrade_upgrade_matches_models(empty_db_url: str) -> None:
    engine = create_async_engine(empty_db_url, poolclass=pool.NullPool)
    try:
        await migrate.upgrade(engine)
        assert await _tables(engine) == TABLES | {"alembic_version"}
        assert await migrate.current_revision(engine) == migrate.head_revision()

        await migrate.downgrade(engine, "base")
        assert await _tables(engine) == {"alembic_version"}
        assert await migrate.current_revision(engine) is None

        await migrate.upgrade(engine)
        async with engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await engine.dispose()


async def _thread(session: AsyncSession) -> Thread:
    account = Account(name="a")
    session.add(account)
    await session.flush()
    thread = Thread(account_id=account.id, model="m", metadata_={"k": "v"})
    session.add(thread)
    await session.flush()
    return thread


def _usage(thread: Thread, **overrides) -> UsageRecord:
    values = dict(
        account_id=thread.account_id,
        thread_id=thread.id,
        model="m",
        input_tokens=10,
        cached_tokens=6,
        fresh_tokens=4,
        output_tokens=3,
        price_fresh_input=0,
        price_cached_input=0,
        price_output=0,
        cost=0,
    )
    return UsageRecord(**(values | overrides))


async def test_ledger_rejects_input_that_is_not_cached_plus_fresh(db_session: AsyncSession) -> None:
    thread = await _thread(db_session)
    db_session.add(_usage(thread, input_tokens=11))
    with pytest.raises(IntegrityError, match="ck_usage_ledger_input_split"):
        await db_session.flush()


async def test_idempotency_key_is_unique_per_account(db_session: AsyncSession) -> None:
    thread = await _thread(db_session)
    db_session.add(_usage(thread, idempotency_key="k1"))
    db_session.add(_usage(thread, idempotency_key=None))
    db_session.add(_usage(thread, idempotency_key=None))
    await db_session.flush()
    db_session.add(_usage(thread, idempotency_key="k1"))
    with pytest.raises(IntegrityError, match="uq_usage_ledger_account_id_idempotency_key"):
        await db_session.flush()


async def test_deleting_a_thread_drops_its_messages_and_keeps_its_bill(
    db_session: AsyncSession,
) -> None:
    thread = await _thread(db_session)
    db_session.add(
        Message(thread_id=thread.id, position=0, role="user", content="hi", token_ids=[1, 2])
    )
    usage = _usage(thread)
    db_session.add(usage)
    await db_session.commit()

    await db_session.execute(text("DELETE FROM threads WHERE id = :id"), {"id": thread.id})
    await db_session.commit()
    assert await db_session.scalar(text("SELECT count(*) FROM messages")) == 0
    await db_session.refresh(usage)
    assert usage.thread_id is None
    assert usage.cached_tokens == 6


async def test_message_positions_are_unique_within_a_thread(db_session: AsyncSession) -> None:
    thread = await _thread(db_session)
    for _ in range(2):
        db_session.add(
            Message(thread_id=thread.id, position=0, role="user", content="x", token_ids=[])
        )
    with pytest.raises(IntegrityError, match="uq_messages_thread_id_position"):
        await db_session.flush()


async def test_message_role_is_checked(db_session: AsyncSession) -> None:
    thread = await _thread(db_session)
    db_session.add(
        Message(thread_id=thread.id, position=0, role="robot", content="x", token_ids=[])
    )
    with pytest.raises(IntegrityError, match="ck_messages_role_known"):
        await db_session.flush()
