"""Billing over HTTP: the report API, and what the billing page (app/api/billing_page.py) shares
with it.

    GET /v1/billing/report?start=YYYY-MM-DD&end=YYYY-MM-DD&group_by=day|thread|model&format=json|csv
        The caller's account (bearer key). Days are UTC, `end` is included; without dates, the last
        30 days. Money is a decimal string ("0.0000123"), never a JSON number.

The report's query parameters are declared once, by `provide_report_query`; a route that takes
`report_query: NamedDependency[ReportQuery]` (with REPORT_DEPENDENCIES) gets them:

    report = await report_for(billing, account_id, report_query)    # ApiError 400 if malformed
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from litestar import Response, get
from litestar.datastructures import State
from litestar.di import NamedDependency, Provide
from litestar.params import FromQuery, QueryParameter

from app.api.errors import ApiError
from app.billing.export import report_body, report_csv
from app.billing.report import DayRange, GroupBy, Report, ReportError
from app.billing.service import BillingService

CSV_TYPE = "text/csv"  # Litestar adds the charset


def provide_billing(state: State) -> BillingService:
    return BillingService(state.sessions)


@dataclass(frozen=True)
class ReportQuery:
    """The report's range and grouping as the query gave them; parsed on demand, so the page can
    show a bad value back in its form."""

    start: str | None
    end: str | None
    group_by: str

    def days(self) -> DayRange:
        return DayRange.parse(self.start, self.end)

    def grouping(self) -> GroupBy:
        return GroupBy.parse(self.group_by)


def provide_report_query(
    start: FromQuery[str | None] = None,
    end: FromQuery[str | None] = None,
    group_by: FromQuery[str] = "day",
) -> ReportQuery:
    return ReportQuery(start, end, group_by)


BILLING_DEPENDENCIES = {"billing": Provide(provide_billing, sync_to_thread=False)}
REPORT_DEPENDENCIES = {
    **BILLING_DEPENDENCIES,
    "report_query": Provide(provide_report_query, sync_to_thread=False),
}


async def report_for(billing: BillingService, account_id: str, query: ReportQuery) -> Report:
    try:
        return await billing.report(account_id, query.days(), query.grouping())
    except ReportError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None


def csv_response(report: Report) -> Response[str]:
    name = f"billing-{report.days.start}-{report.days.end}-by-{report.group_by.value}.csv"
    return Response(
        report_csv(report),
        media_type=CSV_TYPE,
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


@get(
    "/billing/report",
    operation_id="billing_report",
    tags=["billing"],
    dependencies=REPORT_DEPENDENCIES,
)
async def billing_report(
    account_id: NamedDependency[str],
    billing: NamedDependency[BillingService],
    report_query: NamedDependency[ReportQuery],
    output: Annotated[str, QueryParameter(name="format")] = "json",
) -> Response[Any]:
    """Turns, tokens, cost, cost without cache and saving per group and in total."""
    if output not in ("json", "csv"):
        raise ApiError(400, "invalid_request", f"format must be json or csv; got {output!r}")
    report = await report_for(billing, account_id, report_query)
    return csv_response(report) if output == "csv" else Response(report_body(report))
