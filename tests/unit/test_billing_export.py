"""Money as exact plain decimal strings; the CSV has a header and one line per report row."""

import csv
import io
from datetime import date
from decimal import Decimal

import pytest

from app.billing.export import SUM_COLUMNS, money, report_csv
from app.billing.report import DayRange, GroupBy, Report, ReportRow, UsageSums


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("0E-10", "0"),
        ("0.0000123000", "0.0000123"),
        ("0.0000001230", "0.000000123"),  # str() would say 1.230E-7
        ("100.0000000000", "100"),
        ("12.5", "12.5"),
        ("-0.25", "-0.25"),
    ],
)
def test_money_is_plain_positional_notation(value, text):
    assert money(Decimal(value)) == text
    assert Decimal(money(Decimal(value))) == Decimal(value)


def test_csv_rows_match_the_report():
    sums = UsageSums(2, 30, 20, 10, 5, Decimal("0.0000050000"), Decimal("0.0000150000"))
    empty = UsageSums(0, 0, 0, 0, 0, Decimal(0), Decimal(0))
    report = Report(
        DayRange(date(2026, 1, 1), date(2026, 1, 2)),
        GroupBy.THREAD,
        [ReportRow("thr_A", sums), ReportRow(None, empty)],
        sums,
    )
    rows = list(csv.reader(io.StringIO(report_csv(report))))
    assert rows[0] == ["thread", *SUM_COLUMNS]
    assert rows[1] == [
        "thr_A",
        "2",
        "30",
        "20",
        "10",
        "5",
        "0.6667",
        "0.000005",
        "0.000015",
        "0.00001",
        "20",
        "0",
        "0",
    ]
    assert rows[2] == ["", "0", "0", "0", "0", "0", "", "0", "0", "0", "0", "0", "0"]
    assert len(rows) == 3
