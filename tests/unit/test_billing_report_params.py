"""The report's query values (strict YYYY-MM-DD dates, end inclusive, start <= end) and its
exact sums."""

from datetime import UTC, date, datetime
from decimal import Decimal, localcontext

import pytest

from app.billing.report import ZERO_SUMS, DayRange, GroupBy, ReportError, UsageSums


def test_a_range_of_utc_days_with_the_end_included():
    days = DayRange.parse("2026-02-27", "2026-03-01")
    assert days.num_days == 3
    assert days.days() == [date(2026, 2, 27), date(2026, 2, 28), date(2026, 3, 1)]
    assert days.bounds() == (datetime(2026, 2, 27, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC))


def test_missing_dates_default_to_the_last_30_days():
    days = DayRange.parse(None, None, today=date(2026, 11, 26))
    assert (days.start, days.end) == (date(2026, 10, 28), date(2026, 11, 26))
    assert DayRange.parse("2026-11-20", None, today=date(2026, 11, 26)).num_days == 7


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        ("2026-1-5", "2026-01-06", "start must be a date as YYYY-MM-DD"),
        ("20260105", "2026-01-06", "YYYY-MM-DD"),
        ("2026-01-05", "2026-02-30", "end is not a real date"),
        ("2026-01-05T00:00", "2026-01-06", "YYYY-MM-DD"),
        ("2026-01-07", "2026-01-06", "start 2026-01-07 is after end 2026-01-06"),
    ],
)
def test_bad_dates_are_errors(start, end, message):
    with pytest.raises(ReportError, match=message):
        DayRange.parse(start, end)


def test_the_last_day_of_the_calendar_has_an_upper_bound():
    assert DayRange.parse("9999-12-30", "9999-12-31").bounds()[1].year == 9999


def test_group_by():
    assert GroupBy.parse("thread") is GroupBy.THREAD
    with pytest.raises(ReportError, match="group_by must be one of day, thread, model"):
        GroupBy.parse("week")


def test_sums_add_up_exactly_beyond_decimals_default_28_digits():
    # A group's sum from Postgres can outgrow numeric(20, 10): here 28 significant digits.
    cost = Decimal("987654321098765432.0000000001")
    big = UsageSums(1, 3, 2, 1, 1, cost, cost)
    total = sum([big] * 3, ZERO_SUMS)
    assert total.cost == Decimal("2962962963296296296.0000000003")  # 29 digits
    assert (total.turns, total.input_tokens, total.cached_tokens) == (3, 9, 6)
    with localcontext(prec=28):  # Decimal's default context would have rounded it
        assert cost + cost + cost != total.cost
