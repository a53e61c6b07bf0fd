"""The report as plain values: money as exact decimal strings, the JSON body and the CSV download.

    report_body(report) -> schemas.BillingReport    the JSON report's body
    report_csv(report) -> str                       its rows as CSV, one column per sum

Money is written in plain positional notation without trailing zeros ("0.0000123", "12.5", "0"):
never as a float, and never in exponent form, which `str(Decimal)` uses for small values
("1.23E-7") and which many spreadsheets and clients misread.
"""

from __future__ import annotations

import csv
import io
from decimal import Decimal

from app.billing import schemas
from app.billing.report import Report, UsageSums

SUM_COLUMNS = (
    "turns",
    "input_tokens",
    "cached_tokens",
    "fresh_tokens",
    "output_tokens",
    "cache_hit_ratio",
    "cost",
    "cost_without_cache",
    "saved",
    "cached_device_tokens",
    "cached_host_tokens",
    "cached_disk_tokens",
)


def money(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def sums_values(sums: UsageSums) -> dict[str, int | float | str | None]:
    """The report's columns for one group or the totals, money as strings."""
    return {
        "turns": sums.turns,
        "input_tokens": sums.input_tokens,
        "cached_tokens": sums.cached_tokens,
        "fresh_tokens": sums.fresh_tokens,
        "output_tokens": sums.output_tokens,
        "cache_hit_ratio": sums.cache_hit_ratio,
        "cost": money(sums.cost),
        "cost_without_cache": money(sums.cost_without_cache),
        "saved": money(sums.saved),
        "cached_device_tokens": sums.cached_device_tokens,
        "cached_host_tokens": sums.cached_host_tokens,
        "cached_disk_tokens": sums.cached_disk_tokens,
    }


def report_csv(report: Report) -> str:
    """The report's rows (not the totals) with a header; the first column is named after the
    grouping (day, thread or model). A missing ratio and a deleted thread are empty cells."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow((report.group_by.value, *SUM_COLUMNS))
    for row in report.rows:
        values = sums_values(row.sums)
        writer.writerow((row.key, *(values[c] for c in SUM_COLUMNS)))
    return out.getvalue()


def report_body(report: Report) -> schemas.BillingReport:
    return schemas.BillingReport(
        start=report.days.start.isoformat(),
        end=report.days.end.isoformat(),
        group_by=report.group_by.value,
        rows=[schemas.ReportRow(key=row.key, **sums_values(row.sums)) for row in report.rows],
        totals=schemas.ReportSums(**sums_values(report.totals)),
    )
