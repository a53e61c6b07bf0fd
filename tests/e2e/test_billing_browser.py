"""The billing page in real headless Chromium (Debian's /usr/bin/chromium, `make chromium`),
driven by Playwright against the app served by uvicorn on a local port.

It signs in through the form, checks that the chart has one bar group per day with turns and the
numbers of the JSON report, that the totals match that report, that the CSV link downloads the
API's CSV, and that the page asks nothing of the network. Screenshot: tests/artifacts/billing.png.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from playwright.async_api import async_playwright

from app.asgi import create_app
from app.billing.prices import UnitPrices
from app.db.accounts import authenticate
from tests.billing_ledger import add_turn, new_thread
from tests.e2e.fake_engine import fake_runtime
from tests.e2e.live_server import live_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]  # Playwright gives every launch a fresh, temporary --user-data-dir
SCREENSHOT = Path(__file__).resolve().parents[1] / "artifacts" / "billing.png"
RANGE = "start=2026-05-01&end=2026-05-14"
PRICES = UnitPrices(Decimal("0.6"), Decimal("0"), Decimal("2.4"))


def _chromium() -> Path:
    if CHROMIUM.is_file():
        return CHROMIUM
    message = f"{CHROMIUM} is missing: run `make chromium` (Debian's package)"
    if os.environ.get("CI"):
        pytest.fail(message)  # CI runs `make test`, which installs it: missing there is a bug
    pytest.skip(message)


@pytest.fixture
def server_url(settings, fake_engine) -> Iterator[str]:
    """The app served by uvicorn on a local port. The page runs no turns, so the fake engine
    stands in for the model."""
    with live_server(create_app(settings, fake_runtime(fake_engine))) as server:
        yield server.url


@pytest.fixture
async def key(db_sessions, new_key) -> str:
    """A key whose account has turns on 9 of the 14 days of RANGE, over 3 threads."""
    secret = await new_key("browser")
    async with db_sessions.begin() as session:
        account_id = (await authenticate(session, secret)).id
        threads = [await new_thread(session, account_id, "builtin-tiny-random") for _ in range(3)]
        for day in (1, 2, 3, 5, 6, 8, 9, 12, 14):
            for turn in range(day % 4 + 1):
                # Later turns of a thread find more of their history in the cache.
                add_turn(session, account_id=account_id, thread_id=threads[turn % 3],
                         model="builtin-tiny-random", cached=turn * 900 + day * 40,
                         fresh=200 + day * 25, output=60 + turn * 10, prices=PRICES,
                         at=datetime(2026, 5, day, 8 + turn, tzinfo=UTC))  # fmt: skip
    return secret


async def test_the_billing_page_in_chromium(server_url, key, tmp_path):
    executable = _chromium()
    async with httpx.AsyncClient(
        base_url=server_url, headers={"Authorization": f"Bearer {key}"}
    ) as api:
        report = (await api.get(f"/v1/billing/report?{RANGE}")).json()
        api_csv = (await api.get(f"/v1/billing/report?{RANGE}&format=csv")).content
    days_with_turns = [row for row in report["rows"] if row["turns"]]
    assert len(days_with_turns) == 9

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(executable), args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(
                viewport={"width": 1100, "height": 900}, accept_downloads=True
            )
            outside: list[str] = []

            async def only_our_server(route):
                if route.request.url.startswith(server_url):
                    await route.continue_()
                else:
                    outside.append(route.request.url)
                    await route.abort()

            await context.route("**/*", only_our_server)
            page = await context.new_page()

            # Sign in once through the form; the cookie carries the session from then on.
            await page.goto(f"{server_url}/billing")
            await page.fill("input[name=api_key]", key)
            async with page.expect_navigation():
                await page.click("button[type=submit]")
            assert await page.locator("#sign-out").count() == 1
            cookies = await context.cookies()
            # Only the session's cookie (the sign-in form's CSRF nonce is spent), HttpOnly,
            # SameSite=Strict and Secure (Chromium keeps Secure cookies of loopback over http).
            assert [(c["name"], c["httpOnly"], c["sameSite"], c["secure"]) for c in cookies] == [
                ("kvthreads_billing", True, "Strict", True)
            ]

            await page.goto(f"{server_url}/billing?{RANGE}")
            groups = page.locator("svg.day-chart g.bar-group")
            assert await groups.count() == len(days_with_turns)
            drawn = await groups.evaluate_all(
                "gs => gs.map(g => [g.dataset.day, +g.dataset.cached, +g.dataset.fresh,"
                " g.getBoundingClientRect().height])"
            )
            assert [d[:3] for d in drawn] == [
                [row["key"], row["cached_tokens"], row["fresh_tokens"]] for row in days_with_turns
            ]
            assert all(height > 0 for *_, height in drawn)

            totals = await page.locator("#totals dd").evaluate_all(
                "dds => Object.fromEntries(dds.map(d => [d.dataset.field, d.dataset.value]))"
            )
            expected = {k: str(v) for k, v in report["totals"].items() if k != "cache_hit_ratio"}
            assert totals == expected

            async with page.expect_download() as download_info:
                await page.click("#csv-link")
            download = await download_info.value
            saved = tmp_path / download.suggested_filename
            await download.save_as(saved)
            assert saved.read_bytes() == api_csv  # byte for byte, CRLF line ends included

            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)

            async with page.expect_navigation():
                await page.click("#sign-out")
            assert await page.locator("input[name=api_key]").count() == 1
            # The session's cookie is gone; the sign-in form shown again brought its CSRF nonce.
            assert [c["name"] for c in await context.cookies()] == ["kvthreads_billing_csrf"]
            assert outside == []  # everything the page needs comes from our server
        finally:
            await browser.close()
