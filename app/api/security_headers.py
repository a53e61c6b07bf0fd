"""Security headers on every response, set in Litestar's `before_send` hook so that error
responses (Litestar's own 404/405/429 included) get them too.

    every response          X-Content-Type-Options: nosniff
    /v1/..., /billing...    Cache-Control: no-store (bills and conversations stay out of caches)
    /billing...             Content-Security-Policy (nothing from elsewhere, no scripts, no
                            framing), X-Frame-Options: DENY, Referrer-Policy: same-origin

The billing page is server-rendered HTML with one inline <style> block and an inline SVG chart;
it runs no script, so the policy allows none.
"""

from __future__ import annotations

from litestar.datastructures import MutableScopeHeaders
from litestar.types import Message, Scope

BILLING_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_NO_STORE_PREFIXES = ("/v1", "/billing")


def _is_under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


async def set_security_headers(message: Message, scope: Scope) -> None:
    if message["type"] != "http.response.start":
        return
    path = scope.get("path", "")
    message.setdefault("headers", [])
    headers = MutableScopeHeaders.from_message(message)
    headers["X-Content-Type-Options"] = "nosniff"
    if any(_is_under(path, prefix) for prefix in _NO_STORE_PREFIXES):
        headers["Cache-Control"] = "no-store"
    if _is_under(path, "/billing"):
        headers["Content-Security-Policy"] = BILLING_CSP
        headers["X-Frame-Options"] = "DENY"
        headers["Referrer-Policy"] = "same-origin"  # no-referrer would make Origin "null"
