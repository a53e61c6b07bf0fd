"""Per-account limits on turns, checked before a turn starts (the request rate per key is the API
layer's, app/api/limits.py).

    quotas = AccountQuotas(max_turns_in_flight=16, monthly_token_budget=0, monthly_spend_budget=None)
    await quotas.check_budget(session, account_id, now)     # raises BudgetExceeded
    async with quotas.turn_slot(conn, account_id): ...      # raises TooManyTurnsInFlight

Turns in flight: an account has `max_turns_in_flight` slots, each a Postgres advisory lock taken
on the turn's own connection (the one that holds the thread's lock, app/threads/turn_lock.py), so
the cap holds across server processes sharing one database and a dead process frees its slots.

Budgets: input + output tokens, and cost, of the account's ledger rows this calendar month (UTC).
A turn is refused once the month's usage has reached a budget; a turn that starts under it may end
over it (its size is known only when it ends), so the overshoot is bounded by the turns in flight.
0 (tokens) or None (cost) turns a budget off.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from app.billing.totals import account_spend
from app.threads.errors import BudgetExceeded, TooManyTurnsInFlight
from app.threads.shield import run_to_completion

_TRY_LOCK = text("SELECT pg_try_advisory_lock(:key)")
_UNLOCK = text("SELECT pg_advisory_unlock(:key)")
SLOT_BUSY_RETRY_S = 1


def slot_key(account_id: str, slot: int) -> int:
    digest = hashlib.blake2b(
        f"kvthreads:account-turns:{account_id}:{slot}".encode(), digest_size=8
    ).digest()
    return int.from_bytes(digest, "big", signed=True)


def month_bounds(now: datetime) -> tuple[datetime, datetime]:
    """The start of `now`'s calendar month (UTC) and of the next one."""
    start = now.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        return start, start.replace(year=start.year + 1, month=1)
    return start, start.replace(month=start.month + 1)


@dataclass(frozen=True)
class AccountQuotas:
    max_turns_in_flight: int = 0  # 0: no cap
    monthly_token_budget: int = 0  # 0: none
    monthly_spend_budget: Decimal | None = None  # None: none

    async def check_budget(self, session: AsyncSession, account_id: str, now: datetime) -> None:
        if not self.monthly_token_budget and self.monthly_spend_budget is None:
            return
        start, end = month_bounds(now)
        spend = await account_spend(session, account_id, start)
        retry_after_s = max(1, int((end - now).total_seconds()))
        if self.monthly_token_budget and spend.tokens >= self.monthly_token_budget:
            raise BudgetExceeded(
                "tokens", str(spend.tokens), str(self.monthly_token_budget), retry_after_s
            )
        if self.monthly_spend_budget is not None and spend.cost >= self.monthly_spend_budget:
            raise BudgetExceeded(
                "spend", str(spend.cost), str(self.monthly_spend_budget), retry_after_s
            )

    @asynccontextmanager
    async def turn_slot(self, conn: AsyncConnection, account_id: str) -> AsyncIterator[None]:
        """Hold one of the account's slots for the block, or raise TooManyTurnsInFlight.

        `conn` must be outside a transaction (each probe commits; the locks are session-level).
        """
        if not self.max_turns_in_flight:
            yield
            return
        key = await run_to_completion(self._take_slot(conn, account_id))
        if key is None:
            raise TooManyTurnsInFlight(self.max_turns_in_flight, SLOT_BUSY_RETRY_S)
        try:
            yield
        finally:

            async def release() -> None:
                try:
                    await conn.execute(_UNLOCK, {"key": key})
                    await conn.commit()
                except Exception:
                    await conn.invalidate()  # closing it is what releases the lock then
                    raise

            await run_to_completion(release())

    async def _take_slot(self, conn: AsyncConnection, account_id: str) -> int | None:
        # From a random slot on: with a few taken, the first try usually succeeds.
        first = random.randrange(self.max_turns_in_flight)
        for i in range(self.max_turns_in_flight):
            key = slot_key(account_id, (first + i) % self.max_turns_in_flight)
            locked = (await conn.execute(_TRY_LOCK, {"key": key})).scalar_one()
            await conn.commit()
            if locked:
                return key
        return None
