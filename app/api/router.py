"""The /v1 API: every route needs a bearer key; thread errors become JSON with their status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from litestar import Request, Response, Router
from litestar.di import Provide
from litestar.types import Middleware

from app.api.auth import provide_account_id
from app.api.billing import billing_report
from app.api.deps import provide_thread_service, provide_turn_service
from app.api.errors import error_response
from app.api.json_body import JSONRequest
from app.api.messages import MessageController
from app.api.threads import ThreadController
from app.threads import errors

STATUS = {
    errors.ThreadNotFound: 404,
    errors.ThreadBusy: 409,
    errors.InvalidField: 400,
    errors.MessageTooLarge: 413,
    errors.ContextLengthExceeded: 400,
    errors.IdempotencyKeyReused: 422,
    errors.IdempotencyConflict: 409,
    errors.GenerationFailed: 500,
    errors.TooManyTurnsInFlight: 429,
    errors.BudgetExceeded: 429,
}


def threads_error_handler(request: Request[Any, Any, Any], exc: errors.ThreadsError) -> Response:
    headers = None
    if isinstance(exc, errors.LimitExceeded):
        headers = {"Retry-After": str(exc.retry_after_s)}
    return error_response(STATUS.get(type(exc), 400), exc.type, exc.message, headers)


# Headroom for a message at the size limit: JSON may spell a character as 6 bytes ("\u00e9"),
# plus the other fields. Bodies past this are refused (413) before they are read whole.
JSON_ESCAPE_FACTOR = 6
BODY_OVERHEAD_BYTES = 64 * 1024


def create_v1_router(max_message_bytes: int, middleware: Sequence[Middleware] = ()) -> Router:
    return Router(
        path="/v1",
        request_max_body_size=max_message_bytes * JSON_ESCAPE_FACTOR + BODY_OVERHEAD_BYTES,
        route_handlers=[ThreadController, MessageController, billing_report],
        dependencies={
            "account_id": Provide(provide_account_id),
            "thread_service": Provide(provide_thread_service, sync_to_thread=False),
            "turn_service": Provide(provide_turn_service, sync_to_thread=False),
        },
        exception_handlers={errors.ThreadsError: threads_error_handler},
        middleware=list(middleware),  # the per-key rate limit (app/api/limits.py)
        request_class=JSONRequest,
    )
