"""Billing over HTTP.

    GET /v1/billing/report?start=YYYY-MM-DD&end=YYYY-MM-DD&group_by=day|thread|model&format=json|csv
        The caller's account (bearer key). Days are UTC, `end` is included; without dates, the last
        30 days. Money is a decimal string ("0.0000123"), never a JSON number.
    GET /billing                  the same as a page: chart, totals, table, CSV link
    POST /billing/sign-in         form field api_key -> signed, HttpOnly cookie, back to /billing
    GET /billing/sign-out         forget the cookie
    GET /billing/report.csv       the page's CSV download (cookie)

The page's cookie holds the key itself, signed with the server's secret and expiring after
SESSION_SECONDS; every request checks the key like the API's bearer auth, so a revoked key stops
working at once.
"""

from __future__ import annotations

import time
from datetime import date
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.datastructures import Cookie, State
from litestar.di import NamedDependency, Provide
from litestar.params import FromQuery, QueryParameter, URLEncodedBody
from litestar.response import Redirect, Template
from markupsafe import Markup

from app.api.errors import ApiError
from app.billing.chart import DayTokens, render_day_chart
from app.billing.export import report_csv, sums_values
from app.billing.report import DayRange, GroupBy, Report, ReportError
from app.billing.service import BillingService
from app.billing.signed_value import sign, unsign

COOKIE = "kvthreads_billing"
SESSION_SECONDS = 8 * 3600
CSV_TYPE = "text/csv"  # Litestar adds the charset


def provide_billing(state: State) -> BillingService:
    return BillingService(state.sessions)


BILLING_DEPENDENCIES = {"billing": Provide(provide_billing, sync_to_thread=False)}


# ------------------------------------------------------------------------------ the JSON report


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


class ReportRow(ReportSums, kw_only=True):
    key: str | None  # the day, thread id or model; null: turns of threads since deleted


class BillingReport(msgspec.Struct, kw_only=True):
    object: Literal["billing.report"] = "billing.report"
    start: str
    end: str
    group_by: str
    rows: list[ReportRow]
    totals: ReportSums


def report_body(report: Report) -> BillingReport:
    return BillingReport(
        start=report.days.start.isoformat(),
        end=report.days.end.isoformat(),
        group_by=report.group_by.value,
        rows=[ReportRow(key=row.key, **sums_values(row.sums)) for row in report.rows],
        totals=ReportSums(**sums_values(report.totals)),
    )


async def _report(
    billing: BillingService, account_id: str, start: str | None, end: str | None, group_by: str
) -> Report:
    try:
        return await billing.report(account_id, DayRange.parse(start, end), GroupBy.parse(group_by))
    except ReportError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None


def _csv_response(report: Report) -> Response[str]:
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
    dependencies=BILLING_DEPENDENCIES,
)
async def billing_report(
    account_id: NamedDependency[str],
    billing: NamedDependency[BillingService],
    start: FromQuery[str | None] = None,
    end: FromQuery[str | None] = None,
    group_by: FromQuery[str] = "day",
    output: Annotated[str, QueryParameter(name="format")] = "json",
) -> Response[Any]:
    """Turns, tokens, cost, cost without cache and saving per group and in total."""
    if output not in ("json", "csv"):
        raise ApiError(400, "invalid_request", f"format must be json or csv; got {output!r}")
    report = await _report(billing, account_id, start, end, group_by)
    return _csv_response(report) if output == "csv" else Response(report_body(report))


# ------------------------------------------------------------------------------------ the page


class SignInForm(msgspec.Struct):
    api_key: str


def _chart(by_day: Report) -> Markup:
    days = [
        DayTokens(date.fromisoformat(row.key or ""), row.sums.cached_tokens, row.sums.fresh_tokens)
        for row in by_day.rows
    ]
    return Markup(render_day_chart(days))  # our own markup; every value in it is a number or date


class BillingPageController(Controller):
    path = "/billing"
    tags = ["billing"]
    include_in_schema = False
    dependencies = BILLING_DEPENDENCIES

    async def _signed_in_account(self, request: Request, billing: BillingService) -> str | None:
        token = request.cookies.get(COOKIE)
        secret = unsign(token, request.app.state.settings.secret, time.time()) if token else None
        return None if secret is None else await billing.account_for_key(secret)

    @get("/", operation_id="billing_page")
    async def page(
        self,
        request: Request,
        billing: NamedDependency[BillingService],
        start: FromQuery[str | None] = None,
        end: FromQuery[str | None] = None,
        group_by: FromQuery[str] = "day",
    ) -> Template:
        account_id = await self._signed_in_account(request, billing)
        if account_id is None:
            if COOKIE in request.cookies:
                return _sign_in_page("Your sign-in expired or its key was revoked.", 401)
            return _sign_in_page(None, 200)
        form = {"start": start or "", "end": end or "", "group_by": group_by}
        try:
            days = DayRange.parse(start, end)
            grouping = GroupBy.parse(group_by)
            by_day = await billing.report(account_id, days, GroupBy.DAY)
            table = by_day
            if grouping is not GroupBy.DAY:
                table = await billing.report(account_id, days, grouping)
        except ReportError as exc:
            context = {"form": form, "error": str(exc)}
            return Template("billing/report.html", context=context, status_code=400)
        query = f"start={days.start}&end={days.end}&group_by={grouping.value}"
        return Template(
            "billing/report.html",
            context={
                "form": {"start": days.start, "end": days.end, "group_by": grouping.value},
                "chart": _chart(by_day),
                "totals": sums_values(by_day.totals),
                "table": [(row.key, sums_values(row.sums)) for row in table.rows],
                "group_by": grouping.value,
                "csv_url": f"/billing/report.csv?{query}",
            },
        )

    @post("/sign-in", operation_id="billing_sign_in", status_code=303)
    async def sign_in(
        self,
        request: Request,
        billing: NamedDependency[BillingService],
        data: URLEncodedBody[SignInForm],
    ) -> Response[Any]:
        secret = data.api_key.strip()
        if not secret or await billing.account_for_key(secret) is None:
            return _sign_in_page("That key is not valid (unknown or revoked).", status_code=401)
        expires_at = int(time.time()) + SESSION_SECONDS
        cookie = Cookie(
            key=COOKIE,
            value=sign(secret, request.app.state.settings.secret, expires_at),
            path="/billing",
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="lax",
            secure=request.url.scheme == "https",
        )
        return Redirect("/billing", status_code=303, cookies=[cookie])

    @get("/sign-out", operation_id="billing_sign_out", status_code=303)
    async def sign_out(self) -> Redirect:
        return Redirect("/billing", status_code=303, cookies=[_forget_cookie()])

    @get("/report.csv", operation_id="billing_page_csv", media_type=MediaType.TEXT)
    async def csv(
        self,
        request: Request,
        billing: NamedDependency[BillingService],
        start: FromQuery[str | None] = None,
        end: FromQuery[str | None] = None,
        group_by: FromQuery[str] = "day",
    ) -> Response[str]:
        account_id = await self._signed_in_account(request, billing)
        if account_id is None:
            raise ApiError(401, "unauthorized", "sign in at /billing first")
        return _csv_response(await _report(billing, account_id, start, end, group_by))


def _forget_cookie() -> Cookie:
    return Cookie(key=COOKIE, value="", path="/billing", max_age=0, httponly=True)


def _sign_in_page(error: str | None, status_code: int) -> Template:
    cookies = [_forget_cookie()] if error else None
    return Template(
        "billing/sign_in.html", context={"error": error}, status_code=status_code, cookies=cookies
    )
