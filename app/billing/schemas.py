"""The billing API's response bodies: msgspec structs, money as exact decimal strings.

report_body(report) -> BillingReport        (app/billing/export.py builds it)

{"object": "billing.report", "start": "2026-01-01", "end": "2026-01-30", "group_by": "day",
 "rows": [{"key": "2026-01-01", "turns": 3, ..., "cost": "0.0000123", ...}, ...],
 "totals": {"turns": 3, ...}}
"""

from __future__ import annotations

from typing import Literal

import msgspec


class ReportSums(msgspec.Struct, kw_only=True):
    turns: int
    input_tokens: int
    cached_tokens: int
    fresh_tokens: int
    output_tokens: int
    cache_hit_ratio: float | None  # cached / input; null when there was no input
    cost: str  # exact decimal
    cost_without_cache: str  # every input token at the fresh price
    saved: str  # cost_without_cache - cost
    # cached_tokens by the KV tier they were served from
    cached_device_tokens: int = 0
    cached_host_tokens: int = 0
    cached_disk_tokens: int = 0


class ReportRow(ReportSums, kw_only=True):
    key: str | None  # the day, thread id or model; null: turns of threads since deleted


class BillingReport(msgspec.Struct, kw_only=True):
    object: Literal["billing.report"] = "billing.report"
    start: str
    end: str
    group_by: str
    rows: list[ReportRow]
    totals: ReportSums
