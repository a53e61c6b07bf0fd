"""The billing page: the report of app/api/billing.py as HTML, signed in with a cookie.

    GET /billing                  chart, totals, table, CSV link (?start&end&group_by as the API)
    POST /billing/sign-in         form fields api_key, csrf_token -> session cookie, back to /billing
    GET /billing/sign-out         end the session server-side, forget the cookie
    GET /billing/report.csv       the page's CSV download (cookie)

Sign-in is a server-side session (app/db/billing_sessions.py): the cookie holds a random token,
never the key; the database keeps its hash, and the session ends after SESSION_SECONDS, on
sign-out, or when its key is revoked. Cookies are HttpOnly, SameSite=Strict, Path=/billing, and
Secure unless KVTHREADS_SECURE_COOKIES is off.

Login CSRF: the sign-in form carries a token, signed with the server's secret, of a random nonce
that also sits in its own cookie (double submit); a POST whose token does not match its cookie, or
whose Origin names another host, is refused with 403. Sign-in attempts are rate limited per client
address (app/api/limits.py).
"""

from __future__ import annotations

import hmac
import secrets
import time
from datetime import date
from typing import Any
from urllib.parse import urlsplit

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
CSRF_COOKIE = "kvthreads_billing_csrf"
SESSION_SECONDS = 8 * 3600
CSRF_SECONDS = 3600  # how long a sign-in form stays usable


class SignInForm(msgspec.Struct):
    api_key: str
    csrf_token: str = ""


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
        return await billing.session_account(token) if token else None

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
                return _sign_in_page(request, "Your sign-in expired or its key was revoked.", 401)
            return _sign_in_page(request, None, 200)
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
        if not _same_origin(request) or not _csrf_ok(request, data.csrf_token):
            message = "This sign-in form expired or came from another site; please try again."
            return _sign_in_page(request, message, 403)
        secret = data.api_key.strip()
        token = await billing.start_session(secret, SESSION_SECONDS) if secret else None
        if token is None:
            return _sign_in_page(request, "That key is not valid (unknown or revoked).", 401)
        cookie = _cookie(request, COOKIE, token, SESSION_SECONDS)
        # The nonce has done its job: a new form gets a new one.
        return Redirect(
            "/billing", status_code=303, cookies=[cookie, _forget(request, CSRF_COOKIE)]
        )

    @get("/sign-out", operation_id="billing_sign_out", status_code=303)
    async def sign_out(
        self, request: Request, billing: NamedDependency[BillingService]
    ) -> Redirect:
        if token := request.cookies.get(COOKIE):
            await billing.end_session(token)
        return Redirect("/billing", status_code=303, cookies=[_forget(request, COOKIE)])

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


def _cookie(request: Request, key: str, value: str, max_age: int) -> Cookie:
    return Cookie(
        key=key,
        value=value,
        path="/billing",
        max_age=max_age,
        httponly=True,
        samesite="strict",
        secure=request.app.state.settings.secure_cookies,
    )


def _forget(request: Request, key: str) -> Cookie:
    return _cookie(request, key, "", 0)


def _same_origin(request: Request) -> bool:
    """No Origin header (old browsers, non-browser clients: the token decides), or one naming
    this host. Only the host is compared: behind a TLS proxy the scheme seen here is http."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return origin != "null" and urlsplit(origin).netloc.lower() == host.lower()


def _csrf_ok(request: Request, form_token: str) -> bool:
    nonce = request.cookies.get(CSRF_COOKIE)
    if not nonce or not form_token:
        return False
    signed = unsign(form_token, request.app.state.settings.secret, time.time())
    return signed is not None and hmac.compare_digest(signed, nonce)


def _sign_in_page(request: Request, error: str | None, status_code: int) -> Template:
    """The form with a fresh CSRF nonce (cookie) and its signed token (hidden field)."""
    nonce = secrets.token_urlsafe(32)
    expires_at = int(time.time()) + CSRF_SECONDS
    csrf_token = sign(nonce, request.app.state.settings.secret, expires_at)
    cookies = [_cookie(request, CSRF_COOKIE, nonce, CSRF_SECONDS)]
    if error and COOKIE in request.cookies:
        cookies.append(_forget(request, COOKIE))
    return Template(
        "billing/sign_in.html",
        context={"error": error, "csrf_token": csrf_token},
        status_code=status_code,
        cookies=cookies,
    )
