"""Test helper: write ledger rows directly, the way a turn bills itself (app/billing/ledger.py),
for report tests that need many turns, several days or several accounts without running a model."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from app.billing.ledger import TurnTokens, usage_row
from app.billing.prices import UnitPrices
from app.db.models import Account, Thread, UsageRecord


async def new_account(session: AsyncSession, name: str = "acme") -> str:
    account = Account(name=name)
    session.add(account)
    await session.flush()
    return account.id


async def new_thread(session: AsyncSession, account_id: str, model: str) -> str:
    thread = Thread(account_id=account_id, model=model)
    session.add(thread)
    await session.flush()
    return thread.id


def add_turn(
    session: AsyncSession,
    *,
    account_id: str,
    thread_id: str | None,
    model: str,
    cached: int,
    fresh: int,
    output: int,
    prices: UnitPrices,
    at: datetime,
) -> UsageRecord:
    tokens = TurnTokens(
        input_tokens=cached + fresh, cached_tokens=cached, fresh_tokens=fresh, output_tokens=output
    )
    miss_reason = None if cached else "new_thread"
    row = usage_row(
        account_id, thread_id, model, prices, tokens, miss_reason=miss_reason, timings={}
    )
    row.created_at = at
    session.add(row)  # written at the caller's next flush or commit
    return row
