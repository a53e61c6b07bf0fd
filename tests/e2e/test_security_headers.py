"""Security headers: nosniff everywhere, no-store on the API and the billing page, and a CSP with
frame denial on the billing page; error responses included."""

from __future__ import annotations

import pytest

from app.api.security_headers import BILLING_CSP
from tests.e2e.fake_engine import fake_runtime


@pytest.mark.parametrize(
    ("path", "status"),
    [("/v1/threads", 200), ("/v1/threads/thr_nope", 404), ("/v1/billing/report", 200)],
)
async def test_api_responses_are_nosniff_and_no_store(fake_api, path, status):
    r = await fake_api.get(path)
    assert r.status_code == status
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"


async def test_errors_and_unauthenticated_api_responses_carry_them_too(open_api, fake_engine):
    client = await open_api(fake_runtime(fake_engine))
    r = await client.get("/v1/threads")
    assert r.status_code == 401
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["cache-control"] == "no-store"
    r = await client.get("/no-such-route")
    assert r.status_code == 404 and r.headers["x-content-type-options"] == "nosniff"
    r = await client.get("/healthz")
    assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("path", ["/billing", "/billing/report.csv", "/billing/sign-out"])
async def test_the_billing_page_denies_framing_and_has_a_csp(fake_api, path):
    r = await fake_api.get(path, follow_redirects=False)
    csp = r.headers["content-security-policy"]
    assert csp == BILLING_CSP
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    assert "script-src" not in csp  # falls back to default-src 'none': no script runs
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_the_api_has_no_page_policy(fake_api):
    r = await fake_api.get("/v1/threads")
    assert "content-security-policy" not in r.headers and "x-frame-options" not in r.headers
