"""Ledger totals over all accounts, per model: what /metrics exports for operators."""

from __future__ import annotations

from dataclasses import dataclass

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
