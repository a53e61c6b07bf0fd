"""GET /v1/billing/report and the /billing page's sign-in cookie, over HTTP.

Ledger rows are written directly here (tests/billing_ledger.py); the reconciliation through real
turns and /metrics are in test_billing_reconcile.py, the page in a browser test_billing_browser.py.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import csv
import io
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select, update

from app.api.billing_page import COOKIE
from app.billing.prices import UnitPrices
from app.db.accounts import KEY_PREFIX, authenticate, revoke_key
from app.db.models import BillingSession
from tests.billing_ledger import add_turn, new_thread
from tests.e2e.fake_engine import fake_runtime

PRICES = UnitPrices(Decimal("0.5"), Decimal("0.01"), Decimal("1.5"))
RANGE = "start=2026-05-01&end=2026-05-03"


@pytest.fixture
async def account(db_sessions, new_key):
    """An account with a key and three turns on May 1 and 3, 2026 (two threads, two models)."""
    secret = await new_key("billing")
    async with db_sessions.begin() as session:
        account_id = (await authenticate(session, secret)).id
        a = await new_thread(session, account_id, "model-a")
        b = await new_thread(session, account_id, "model-b")
        for thread, model, day, cached in ((a, "model-a", 1, 0), (a, "model-a", 3, 900),
                                           (b, "model-b", 3, 0)):  # fmt: skip
            add_turn(session, account_id=account_id, thread_id=thread, model=model, cached=cached,
                     fresh=100, output=20, prices=PRICES, at=datetime(2026, 5, day, 9, tzinfo=UTC))  # fmt: skip
    return {"key": secret, "id": account_id, "threads": (a, b)}


@pytest.fixture
def open_billing(open_api, fake_engine):
    """An app whose engine is the fake one: these tests run no turns, so no model is loaded.
    Over https, as a client keeps the page's Secure cookies only there."""

    async def open_client(**overrides):
        client = await open_api(fake_runtime(fake_engine), **overrides)
        client.base_url = "https://testserver.local"
        return client

    return open_client


@pytest.fixture
async def api(open_billing, account):
    client = await open_billing()
    client.headers["Authorization"] = f"Bearer {account['key']}"
    return client


async def test_report_by_day_lists_every_day_and_money_as_strings(api):
    r = await api.get(f"/v1/billing/report?{RANGE}")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["object"], body["start"], body["end"], body["group_by"]) == (
        "billing.report", "2026-05-01", "2026-05-03", "day")  # fmt: skip
    assert [row["key"] for row in body["rows"]] == ["2026-05-01", "2026-05-02", "2026-05-03"]
    assert body["rows"][1]["turns"] == 0 and body["rows"][1]["cache_hit_ratio"] is None
    totals = body["totals"]
    # cost: 300 fresh x 0.5 + 900 cached x 0.01 + 60 output x 1.5 = 249 per million tokens;
    # without the cache: 1200 input x 0.5 + 60 x 1.5 = 690 per million.
    assert totals == {
        "turns": 3, "input_tokens": 1200, "cached_tokens": 900, "fresh_tokens": 300,
        "output_tokens": 60, "cache_hit_ratio": 0.75, "cost": "0.000249",
        "cost_without_cache": "0.00069", "saved": "0.000441",
        "cached_device_tokens": 900, "cached_host_tokens": 0, "cached_disk_tokens": 0,
    }  # fmt: skip


async def test_report_by_thread_and_model(api, account):
    by_thread = (await api.get(f"/v1/billing/report?{RANGE}&group_by=thread")).json()
    assert [row["key"] for row in by_thread["rows"]] == list(account["threads"])
    assert [row["turns"] for row in by_thread["rows"]] == [2, 1]
    by_model = (await api.get(f"/v1/billing/report?{RANGE}&group_by=model")).json()
    assert [(row["key"], row["cost"]) for row in by_model["rows"]] == [
        ("model-a", "0.000169"), ("model-b", "0.00008")]  # fmt: skip


async def test_csv_has_a_header_and_the_same_rows_as_json(api):
    for group_by in ("day", "thread", "model"):
        query = f"{RANGE}&group_by={group_by}"
        body = (await api.get(f"/v1/billing/report?{query}")).json()
        r = await api.get(f"/v1/billing/report?{query}&format=csv")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/csv")
        assert "attachment" in r.headers["content-disposition"]
        header, *rows = csv.reader(io.StringIO(r.text))
        assert header[0] == group_by
        assert rows == [
            [row["key"], *("" if row[c] is None else str(row[c]) for c in header[1:])]
            for row in body["rows"]
        ]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("start=2026-05-03&end=2026-05-01", "start 2026-05-03 is after end 2026-05-01"),
        ("start=2026-02-30", "start is not a real date"),
        ("start=May+1", "start must be a date as YYYY-MM-DD"),
        ("end=2026-5-1", "end must be a date as YYYY-MM-DD"),
        ("group_by=week", "group_by must be one of day, thread, model"),
        ("format=xml", "format must be json or csv"),
        ("start=1900-01-01&end=2026-01-01", "too long to group by day"),
    ],
)
async def test_bad_queries_are_400(api, query, message):
    r = await api.get(f"/v1/billing/report?{query}")
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request"
    assert message in r.json()["error"]["message"]


async def test_the_report_needs_a_key_and_shows_only_the_callers_account(
    open_billing, api, new_key
):
    anonymous = await open_billing()
    assert (await anonymous.get(f"/v1/billing/report?{RANGE}")).status_code == 401
    other = await new_key("other")
    r = await anonymous.get(f"/v1/billing/report?{RANGE}", headers={"Authorization": f"Bearer {other}"})  # fmt: skip
    assert r.status_code == 200 and r.json()["totals"]["turns"] == 0
    assert (await api.get(f"/v1/billing/report?{RANGE}")).json()["totals"]["turns"] == 3


# ------------------------------------------------------------------------------------- the page


def _form_token(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "the sign-in form has no CSRF token"
    return match.group(1)


async def _sign_in(client, key: str, **headers):
    """Sign in as a browser does: load the form (its CSRF cookie and token), then post it."""
    token = _form_token((await client.get("/billing")).text)
    form = {"api_key": key, "csrf_token": token}
    return await client.post("/billing/sign-in", data=form, headers=headers, follow_redirects=False)


def _decodings(value: str) -> list[bytes]:
    """The value and whatever base64 of any alphabet makes of it or of its dot-separated parts."""
    out = [value.encode()]
    for part in [value, *value.split(".")]:
        for decode in (base64.urlsafe_b64decode, base64.b64decode):
            with contextlib.suppress(binascii.Error, ValueError):
                out.append(decode(part + "=" * (-len(part) % 4)))
    return out


async def test_sign_in_sets_a_strict_secure_http_only_session_cookie(open_billing, account):
    client = await open_billing()
    r = await client.get("/billing")
    assert r.status_code == 200 and 'action="/billing/sign-in"' in r.text
    r = await _sign_in(client, "kvt_not-a-key")
    assert r.status_code == 401 and "not valid" in r.text
    r = await _sign_in(client, account["key"])
    assert r.status_code == 303 and r.headers["location"] == "/billing"
    session_cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith(f"{COOKIE}="))
    for attribute in ("HttpOnly", "SameSite=Strict", "Secure", "Path=/billing"):
        assert attribute.lower() in session_cookie.lower()
    r = await client.get(f"/billing?{RANGE}")
    assert r.status_code == 200
    assert 'data-field="cost" data-value="0.000249"' in r.text
    assert r.text.count('class="bar-group"') == 2  # May 1 and 3; May 2 has no turns
    r = await client.get(f"/billing/report.csv?{RANGE}")
    assert r.status_code == 200 and r.text.startswith("day,turns,")


async def test_the_cookie_holds_no_key_material_and_is_no_api_credential(open_billing, account):
    client = await open_billing()
    await _sign_in(client, account["key"])
    value = client.cookies[COOKIE]
    key_body = account["key"].removeprefix(KEY_PREFIX)
    for decoded in _decodings(value):
        assert key_body.encode() not in decoded and key_body[:12].encode() not in decoded
    r = await client.get("/v1/threads", headers={"Authorization": f"Bearer {value}"})
    assert r.status_code == 401


async def test_a_forged_cookie_or_a_revoked_key_signs_out(open_billing, account, db_sessions):
    client = await open_billing()
    await _sign_in(client, account["key"])
    client.cookies.set(COOKIE, "A" * 43, path="/billing")
    r = await client.get("/billing")
    assert r.status_code == 401 and 'action="/billing/sign-in"' in r.text
    assert (await client.get("/billing/report.csv")).status_code == 401

    client.cookies.clear()
    await _sign_in(client, account["key"])
    assert (await client.get("/billing")).status_code == 200
    async with db_sessions.begin() as session:
        await revoke_key(session, account["key"])
    r = await client.get("/billing")
    assert r.status_code == 401 and "revoked" in r.text
    assert (await client.get("/billing/report.csv")).status_code == 401


async def test_revoking_the_key_ends_its_sessions(open_billing, account, db_sessions):
    browsers = [await open_billing(), await open_billing()]
    for browser in browsers:
        await _sign_in(browser, account["key"])
    async with db_sessions.begin() as session:
        await revoke_key(session, account["key"])
    async with db_sessions() as session:
        ended = (await session.scalars(select(BillingSession.revoked_at))).all()
    assert len(ended) == 2 and all(at is not None for at in ended)
    for browser in browsers:
        assert (await browser.get("/billing")).status_code == 401


async def test_sign_out_ends_the_session_server_side(open_billing, account):
    client = await open_billing()
    await _sign_in(client, account["key"])
    old = client.cookies[COOKIE]
    r = await client.get("/billing/sign-out", follow_redirects=False)
    assert r.status_code == 303 and "Max-Age=0" in r.headers["set-cookie"]
    client.cookies.clear()  # what the browser does with Max-Age=0
    r = await client.get("/billing")
    assert r.status_code == 200 and 'action="/billing/sign-in"' in r.text
    # Someone who kept a copy of the cookie replays it: the session is over.
    client.cookies.set(COOKIE, old, path="/billing")
    r = await client.get("/billing")
    assert r.status_code == 401 and 'action="/billing/sign-in"' in r.text
    assert (await client.get("/billing/report.csv")).status_code == 401


async def test_a_session_expires(open_billing, account, db_sessions):
    client = await open_billing()
    await _sign_in(client, account["key"])
    assert (await client.get("/billing")).status_code == 200
    async with db_sessions.begin() as session:
        await session.execute(
            update(BillingSession).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    r = await client.get("/billing")
    assert r.status_code == 401 and "expired" in r.text


async def test_cross_origin_sign_in_is_refused(open_billing, account):
    client = await open_billing()
    r = await _sign_in(client, account["key"], Origin="http://evil.example")
    assert r.status_code == 403 and COOKIE not in client.cookies
    # A form posted from elsewhere has no token matching this browser's CSRF cookie.
    await client.get("/billing")
    r = await client.post(
        "/billing/sign-in", data={"api_key": account["key"]}, follow_redirects=False
    )
    assert r.status_code == 403 and COOKIE not in client.cookies
    foreign = await open_billing()  # a token the attacker fetched for himself
    stolen = _form_token((await foreign.get("/billing")).text)
    r = await client.post(
        "/billing/sign-in",
        data={"api_key": account["key"], "csrf_token": stolen},
        follow_redirects=False,
    )
    assert r.status_code == 403 and COOKIE not in client.cookies
    # The same origin, with the form's token, signs in.
    r = await _sign_in(client, account["key"], Origin="https://testserver.local")
    assert r.status_code == 303 and COOKIE in client.cookies


async def test_insecure_cookies_only_when_configured(open_billing, account):
    client = await open_billing(secure_cookies=False)
    r = await _sign_in(client, account["key"])
    assert r.status_code == 303 and "secure" not in r.headers["set-cookie"].lower()


async def test_the_page_says_what_is_wrong_with_a_range(open_billing, account):
    client = await open_billing()
    await _sign_in(client, account["key"])
    r = await client.get("/billing?start=2026-05-03&end=2026-05-01")
    assert r.status_code == 400 and "is after end" in r.text
    r = await client.get(f"/billing?{RANGE}&group_by=model")
    assert r.status_code == 200 and 'data-key="model-b"' in r.text
