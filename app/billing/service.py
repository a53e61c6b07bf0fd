"""What the HTTP layer asks of billing: an account's report, the ledger's totals, and who a key
belongs to (for the billing page's cookie, checked exactly like the API's bearer key)."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.billing.report import DayRange, GroupBy, Report, build_report
from app.billing.totals import ModelTotals, ledger_totals
from app.db.accounts import authenticate


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

    async def account_for_key(self, secret: str) -> str | None:
        """The account id of an active (unrevoked) key, or None."""
        async with self.sessions.begin() as session:  # authenticate() records the key's use
            account = await authenticate(session, secret)
        return None if account is None else account.id
