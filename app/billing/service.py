"""What the HTTP layer asks of billing: an account's report, the ledger's totals, and the billing
page's server-side sign-ins (app/db/billing_sessions.py)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.billing.report import DayRange, GroupBy, Report, build_report
from app.billing.totals import ModelTotals, ledger_totals
from app.db import billing_sessions


class BillingService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def report(self, account_id: str, days: DayRange, group_by: GroupBy) -> Report:
        """Raises ReportError for a range too long to group by day."""
        async with self.sessions() as session:
            return await build_report(session, account_id, days, group_by)

    async def ledger_totals(self) -> list[ModelTotals]:
        async with self.sessions() as session:
            return await ledger_totals(session)

    async def start_session(self, secret: str, ttl_seconds: int) -> str | None:
        """A sign-in token for an active key, or None."""
        async with self.sessions.begin() as session:
            return await billing_sessions.start_session(session, secret, ttl_seconds)

    async def session_account(self, token: str) -> str | None:
        async with self.sessions() as session:
            return await billing_sessions.session_account(session, token)

    async def end_session(self, token: str) -> None:
        async with self.sessions.begin() as session:
            await billing_sessions.end_session(session, token)
