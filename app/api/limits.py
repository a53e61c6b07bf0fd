"""Request rate limits, with Litestar's RateLimitMiddleware (a sliding window per identifier, kept
in the app's memory store: per process).

    /v1/...                   KVTHREADS_RATE_LIMIT_PER_MINUTE requests per API key (the SHA-256 of
                              the bearer key names its bucket; requests without one, the client
                              address)
    POST /billing/sign-in     KVTHREADS_SIGN_IN_LIMIT_PER_MINUTE attempts per client address

Over a limit: 429 `{"error": {"type": "rate_limited", ...}}` with Retry-After (seconds) and the
middleware's RateLimit-* headers. The per-account limits on turns (in flight, monthly budgets) are
the threads layer's (app/threads/quotas.py).
"""

from __future__ import annotations

import hashlib
from typing import Any

from litestar import Request, Response
from litestar.exceptions import TooManyRequestsException
from litestar.middleware.base import DefineMiddleware
from litestar.middleware.rate_limit import RateLimitConfig, get_remote_address

from app.api.errors import error_response
from app.config import Settings

SIGN_IN_PATH = "/billing/sign-in"
RESET_HEADER = "RateLimit-Reset"


def api_key_or_address(request: Request[Any, Any, Any]) -> str:
    authorization = request.headers.get("authorization")
    if authorization:
        return "key:" + hashlib.sha256(authorization.strip().encode()).hexdigest()
    return "address:" + get_remote_address(request)


def _is_sign_in(request: Request[Any, Any, Any]) -> bool:
    return request.method == "POST" and request.url.path == SIGN_IN_PATH


def api_rate_limit(settings: Settings) -> list[DefineMiddleware]:
    """The /v1 router's middleware: none when the limit is off (0)."""
    if not settings.rate_limit_per_minute:
        return []
    config = RateLimitConfig(
        rate_limit=("minute", settings.rate_limit_per_minute),
        identifier_for_request=api_key_or_address,
        store="rate_limit_api",
    )
    return [config.middleware]


def sign_in_rate_limit(settings: Settings) -> list[DefineMiddleware]:
    """App middleware that counts only POST /billing/sign-in; none when the limit is off (0)."""
    if not settings.sign_in_limit_per_minute:
        return []
    config = RateLimitConfig(
        rate_limit=("minute", settings.sign_in_limit_per_minute),
        identifier_for_request=get_remote_address,
        check_throttle_handler=_is_sign_in,
        store="rate_limit_sign_in",
    )
    return [config.middleware]


def rate_limited_handler(
    request: Request[Any, Any, Any], exc: TooManyRequestsException
) -> Response[Any]:
    headers = dict(exc.headers or {})
    try:
        retry_after = max(1, int(headers.get(RESET_HEADER, "1")))
    except ValueError:
        retry_after = 1
    headers["Retry-After"] = str(retry_after)
    message = f"too many requests; retry in {retry_after} s"
    return error_response(429, "rate_limited", message, headers)


LIMIT_HANDLERS = {TooManyRequestsException: rate_limited_handler}
