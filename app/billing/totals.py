"""Ledger totals: over all accounts per model (what /metrics exports for operators), and one
account's spend since a date (what the monthly budgets check)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import UsageRecord


@dataclass(frozen=True)
class ModelTotals:
    model: str
    turns: int
    cached_tokens: int
    fresh_tokens: int
    output_tokens: int


async def ledger_totals(session: AsyncSession) -> list[ModelTotals]:
    """Every turn ever billed, summed per model (sorted by model)."""
    rows = await session.execute(
        select(
            UsageRecord.model,
            func.count(),
            func.sum(UsageRecord.cached_tokens),
            func.sum(UsageRecord.fresh_tokens),
            func.sum(UsageRecord.output_tokens),
        )
        .group_by(UsageRecord.model)
        .order_by(UsageRecord.model)
    )
    return [ModelTotals(*row) for row in rows]


@dataclass(frozen=True)
class AccountSpend:
    tokens: int  # input + output tokens
    cost: Decimal


async def account_spend(session: AsyncSession, account_id: str, since: datetime) -> AccountSpend:
    """What one account's turns since `since` used and cost (the ledger's account/time index)."""
    tokens, cost = (
        await session.execute(
            select(
                func.coalesce(func.sum(UsageRecord.input_tokens + UsageRecord.output_tokens), 0),
                func.coalesce(func.sum(UsageRecord.cost), 0),
            ).where(UsageRecord.account_id == account_id, UsageRecord.created_at >= since)
        )
    ).one()
    return AccountSpend(int(tokens), Decimal(cost))
