"""Every error leaves the service as JSON `{"error": {"type": ..., "message": ...}}`.

Raise `ApiError(status, type, message)` for errors of our own (`ApiError(409, "thread_busy", ...)`).
Litestar's exceptions (validation, 404 routes, 405, ...) get a type from their status code. A
database that cannot be reached (down, frozen past the timeouts) is a 503 `database_unavailable`
with Retry-After; anything else uncaught becomes a 500 `internal_error` whose message reveals
nothing; it is logged.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, ValidationException

from app.db.outage import is_database_unavailable

logger = logging.getLogger("app.api")

ERROR_TYPES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "rate_limited",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(HTTPException):
    """An error with our own type, e.g. ApiError(404, "not_found", "no thread thr_...")."""

    def __init__(
        self,
        status_code: int,
        error_type: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail=message, status_code=status_code, headers=headers)
        self.error_type = error_type


def error_type_for(status_code: int) -> str:
    if status_code in ERROR_TYPES:
        return ERROR_TYPES[status_code]
    return "invalid_request" if 400 <= status_code < 500 else "internal_error"


def error_response(
    status_code: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> Response[dict[str, Any]]:
    return Response(
        {"error": {"type": error_type, "message": message}},
        status_code=status_code,
        media_type=MediaType.JSON,
        headers=headers,
    )


def _validation_message(exc: ValidationException) -> str:
    """Litestar puts the specifics (msgspec's words, the field) in `extra`; say them."""
    details = exc.extra if isinstance(exc.extra, list) else []
    parts = []
    for item in details:
        if not isinstance(item, dict) or not item.get("message"):
            continue
        key, message = item.get("key"), str(item["message"])
        if key == "data" and item.get("source") == "body":
            # Bodies are decoded by app/api/json_body.py; what reaches Litestar is a missing one.
            parts.append("the request body is empty: send a JSON object")
        elif key:
            parts.append(f"{key}: {message[:1].lower()}{message[1:]}")
        else:
            parts.append(message)
    return "; ".join(parts) or exc.detail


def http_exception_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    if isinstance(exc, ApiError):
        return error_response(exc.status_code, exc.error_type, exc.detail, exc.headers)
    if exc.status_code >= 500:
        logger.error(
            "%s %s -> %s: %s", request.method, request.url.path, exc.status_code, exc.detail
        )
        message = HTTPStatus(exc.status_code).phrase.lower()
        return error_response(
            exc.status_code, error_type_for(exc.status_code), message, exc.headers
        )
    message = _validation_message(exc) if isinstance(exc, ValidationException) else exc.detail
    return error_response(exc.status_code, error_type_for(exc.status_code), message, exc.headers)


RETRY_AFTER_S = 5
DATABASE_UNAVAILABLE = (
    "database_unavailable",
    "the database is not answering; nothing was saved, try again shortly",
)


def internal_error_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if is_database_unavailable(exc):
        logger.warning(
            "%s %s -> 503: database unavailable: %r", request.method, request.url.path, exc
        )
        return error_response(
            503, *DATABASE_UNAVAILABLE, headers={"Retry-After": str(RETRY_AFTER_S)}
        )
    logger.exception("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "internal server error")


EXCEPTION_HANDLERS = {
    HTTPException: http_exception_handler,
    Exception: internal_error_handler,
}
