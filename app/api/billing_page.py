"""The billing page: the report of app/api/billing.py as HTML, signed in with a cookie.

    GET /billing                  chart, totals, table, CSV link (?start&end&group_by as the API)
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
from typing import Any

import msgspec
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.di import NamedDependency
from litestar.params import URLEncodedBody
from litestar.response import Redirect, Template
from markupsafe import Markup

from app.api.billing import REPORT_DEPENDENCIES, ReportQuery, csv_response, report_for
from app.api.errors import ApiError
from app.billing.chart import DayTokens, render_day_chart
from app.billing.export import sums_values
from app.billing.report import GroupBy, Report, ReportError
from app.billing.service import BillingService
from app.billing.signed_value import sign, unsign

COOKIE = "kvthreads_billing"
SESSION_SECONDS = 8 * 3600


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
    dependencies = REPORT_DEPENDENCIES

    async def _signed_in_account(self, request: Request, billing: BillingService) -> str | None:
        token = request.cookies.get(COOKIE)
        secret = unsign(token, request.app.state.settings.secret, time.time()) if token else None
        return None if secret is None else await billing.account_for_key(secret)

    @get("/", operation_id="billing_page")
    async def page(
        self,
        request: Request,
        billing: NamedDependency[BillingService],
        report_query: NamedDependency[ReportQuery],
    ) -> Template:
        account_id = await self._signed_in_account(request, billing)
        if account_id is None:
            if COOKIE in request.cookies:
                return _sign_in_page("Your sign-in expired or its key was revoked.", 401)
            return _sign_in_page(None, 200)
        try:
            days = report_query.days()
            grouping = report_query.grouping()
            by_day = await billing.report(account_id, days, GroupBy.DAY)
            table = by_day
            if grouping is not GroupBy.DAY:
                table = await billing.report(account_id, days, grouping)
        except ReportError as exc:
            form = {
                "start": report_query.start or "",
                "end": report_query.end or "",
                "group_by": report_query.group_by,
            }
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
        report_query: NamedDependency[ReportQuery],
    ) -> Response[str]:
        account_id = await self._signed_in_account(request, billing)
        if account_id is None:
            raise ApiError(401, "unauthorized", "sign in at /billing first")
        return csv_response(await report_for(billing, account_id, report_query))


def _forget_cookie() -> Cookie:
    return Cookie(key=COOKIE, value="", path="/billing", max_age=0, httponly=True)


def _sign_in_page(error: str | None, status_code: int) -> Template:
    cookies = [_forget_cookie()] if error else None
    return Template(
        "billing/sign_in.html", context={"error": error}, status_code=status_code, cookies=cookies
    )
