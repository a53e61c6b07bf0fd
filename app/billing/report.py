"""The billing report: one account's turns over a range of UTC days, grouped by day, thread or model.

Every group is summed in Postgres (numeric, exact) in one `GROUP BY` query; the totals are the
exact sum of the groups (Decimal, with room for any numeric(20, 10) total). Costs come from each
ledger row's own stored prices, so a price change never rewrites old bills:

    cost               = sum(cost)                 (stored per turn when it was billed)
    cost_without_cache = sum(input_tokens * price_fresh_input + output_tokens * price_output) / 1e6
    saved              = cost_without_cache - cost

Grouping by day lists every day of the range, with zeros on days without turns (the chart draws
an empty slot for them); grouping by thread or model lists only groups that have turns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, localcontext
from enum import StrEnum

from sqlalchemy import Date, cast, func, literal, select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import UsageRecord

PER_MILLION = Decimal("0.000001")  # multiplying by it is exact in numeric; dividing may round
DEFAULT_RANGE_DAYS = 30
# Decimal's default 28 digits could round a large total; numeric(20, 10) sums of up to 10^20
# rows fit in 50.
EXACT_DIGITS = 50
MAX_DAY_ROWS = 3660  # about ten years of daily rows; longer ranges must group by thread or model
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class ReportError(ValueError):
    """A bad report request (a malformed date, start after end, an unknown grouping)."""


class GroupBy(StrEnum):
    DAY = "day"
    THREAD = "thread"
    MODEL = "model"

    @classmethod
    def parse(cls, value: str) -> GroupBy:
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(g.value for g in cls)
            raise ReportError(f"group_by must be one of {known}; got {value!r}") from None


def _parse_day(name: str, value: str) -> date:
    if not _DATE.fullmatch(value):
        raise ReportError(f"{name} must be a date as YYYY-MM-DD, got {value!r}")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise ReportError(f"{name} is not a real date: {value!r}") from None


@dataclass(frozen=True)
class DayRange:
    """UTC days from `start` to `end`, both included."""

    start: date
    end: date

    @classmethod
    def parse(cls, start: str | None, end: str | None, *, today: date | None = None) -> DayRange:
        """From query values; a missing end is today (UTC), a missing start 30 days before end."""
        last = _parse_day("end", end) if end else (today or datetime.now(UTC).date())
        first = _parse_day("start", start) if start else last - timedelta(DEFAULT_RANGE_DAYS - 1)
        if first > last:
            raise ReportError(f"start {first.isoformat()} is after end {last.isoformat()}")
        return cls(first, last)

    @property
    def num_days(self) -> int:
        return (self.end - self.start).days + 1

    def days(self) -> list[date]:
        return [self.start + timedelta(i) for i in range(self.num_days)]

    def bounds(self) -> tuple[datetime, datetime]:
        """[from, to) as UTC instants, so the (account_id, created_at) index serves the range."""
        to_day = self.end + timedelta(1) if self.end < date.max else None
        return (
            datetime.combine(self.start, time(), UTC),
            datetime.combine(to_day, time(), UTC) if to_day else datetime.max.replace(tzinfo=UTC),
        )


@dataclass(frozen=True)
class UsageSums:
    turns: int
    input_tokens: int
    cached_tokens: int
    fresh_tokens: int
    output_tokens: int
    cost: Decimal
    cost_without_cache: Decimal
    # Of cached_tokens, those restored from the host and disk tiers (the rest: the device).
    cached_host_tokens: int = 0
    cached_disk_tokens: int = 0

    @property
    def cached_device_tokens(self) -> int:
        return self.cached_tokens - self.cached_host_tokens - self.cached_disk_tokens

    @property
    def saved(self) -> Decimal:
        return self.cost_without_cache - self.cost

    def __add__(self, other: UsageSums) -> UsageSums:
        with localcontext(prec=EXACT_DIGITS):
            return UsageSums(
                self.turns + other.turns,
                self.input_tokens + other.input_tokens,
                self.cached_tokens + other.cached_tokens,
                self.fresh_tokens + other.fresh_tokens,
                self.output_tokens + other.output_tokens,
                self.cost + other.cost,
                self.cost_without_cache + other.cost_without_cache,
                self.cached_host_tokens + other.cached_host_tokens,
                self.cached_disk_tokens + other.cached_disk_tokens,
            )

    @property
    def cache_hit_ratio(self) -> float | None:
        """cached / input tokens, rounded to 4 places; None when there was no input."""
        return round(self.cached_tokens / self.input_tokens, 4) if self.input_tokens else None


ZERO_SUMS = UsageSums(0, 0, 0, 0, 0, Decimal(0), Decimal(0))


@dataclass(frozen=True)
class ReportRow:
    key: str | None  # the day (YYYY-MM-DD), thread id or model; None: threads since deleted
    sums: UsageSums


@dataclass(frozen=True)
class Report:
    days: DayRange
    group_by: GroupBy
    rows: list[ReportRow]
    totals: UsageSums


def _cached_from(tier: str):
    return func.coalesce(
        func.sum(UsageRecord.cached_tokens).filter(UsageRecord.cache_tier == tier), 0
    )


def _group_key(group_by: GroupBy):
    if group_by is GroupBy.DAY:
        return cast(func.timezone("UTC", UsageRecord.created_at), Date)
    if group_by is GroupBy.THREAD:
        return UsageRecord.thread_id
    return UsageRecord.model


async def build_report(
    session: AsyncSession, account_id: str, days: DayRange, group_by: GroupBy
) -> Report:
    """The report for one account; only that account's ledger rows are read."""
    if group_by is GroupBy.DAY and days.num_days > MAX_DAY_ROWS:
        raise ReportError(
            f"a range of {days.num_days} days is too long to group by day "
            f"(at most {MAX_DAY_ROWS}); group by thread or model, or shorten it"
        )
    key = _group_key(group_by).label("key")
    lo, hi = days.bounds()
    query = (
        select(
            key,
            func.min(UsageRecord.created_at),
            # UsageSums' fields, in order
            func.count(),
            func.sum(UsageRecord.input_tokens),
            func.sum(UsageRecord.cached_tokens),
            func.sum(UsageRecord.fresh_tokens),
            func.sum(UsageRecord.output_tokens),
            func.sum(UsageRecord.cost),
            func.sum(
                UsageRecord.input_tokens * UsageRecord.price_fresh_input
                + UsageRecord.output_tokens * UsageRecord.price_output
            )
            * literal(PER_MILLION),
            _cached_from("host"),
            _cached_from("disk"),
        )
        .where(
            UsageRecord.account_id == account_id,
            UsageRecord.created_at >= lo,
            UsageRecord.created_at < hi,
        )
        .group_by(key)
    )
    groups = [
        (k, first_turn, UsageSums(*values))
        for k, first_turn, *values in await session.execute(query)
    ]
    totals = sum((sums for _, _, sums in groups), ZERO_SUMS)
    return Report(days, group_by, _ordered_rows(group_by, days, groups), totals)


def _ordered_rows(
    group_by: GroupBy, days: DayRange, groups: list[tuple[object, datetime, UsageSums]]
) -> list[ReportRow]:
    if group_by is GroupBy.DAY:
        by_day = {k: sums for k, _, sums in groups}
        return [ReportRow(d.isoformat(), by_day.get(d, ZERO_SUMS)) for d in days.days()]
    if group_by is GroupBy.THREAD:
        # Threads in the order they first ran in the range; the id breaks ties.
        groups.sort(key=lambda g: (g[1], g[0] or ""))
    else:
        groups.sort(key=lambda g: str(g[0]))
    return [ReportRow(None if k is None else str(k), sums) for k, _, sums in groups]
