"""Errors on the OpenAI-shaped routes: {"error": {"message", "type", "param", "code"}}.

The status codes are the same as on the native routes (401, 404, 400, 409, 413, 415, 429, 503),
which is what the OpenAI SDK maps to its exception classes. Each handler here reuses the native
one (app/api/errors.py, router.py, limits.py) and reshapes its body: the native `type` becomes the
`code`, `type` is OpenAI's class of error, and `param` names the offending parameter when known.
A parameter this server does not implement (an unknown field of the body) is named as such.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import msgspec
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, TooManyRequestsException

from app.api.errors import http_exception_handler, internal_error_handler
from app.api.limits import rate_limited_handler
from app.api.router import threads_error_handler
from app.openai.errors import OpenAIError
from app.threads import errors as thread_errors

OPENAI_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_exceeded",
}
# "body: object contains unknown field `tools`" / "input[0]: object contains unknown field `x`"
_UNKNOWN_FIELD = re.compile(
    r"^(?:(?P<path>[^:]*): )?object contains unknown field `(?P<field>[^`]+)`"
)
_PATH = re.compile(r"^(?P<path>[A-Za-z_][\w.\[\]]*): ")
UNSUPPORTED = (
    "this server does not support `{param}` (it serves text in, text out: no tools, reasoning, "
    "images, files, background runs or response formats); leave it out"
)


def openai_error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    return OPENAI_TYPES.get(status, "invalid_request_error")


def openai_response(
    status: int,
    message: str,
    *,
    param: str | None,
    code: str | None,
    error_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response[Any]:
    body = {
        "error": {
            "message": message,
            "type": error_type or openai_error_type(status),
            "param": param,
            "code": code,
        }
    }
    return Response(body, status_code=status, media_type=MediaType.JSON, headers=headers)


def _param_of(message: str) -> tuple[str, str | None]:
    """(message, param) with an unknown field spelled as an unsupported parameter."""
    if match := _UNKNOWN_FIELD.match(message):
        path = match["path"]
        param = match["field"] if path in ("body", "", None) else f"{path}.{match['field']}"
        return UNSUPPORTED.format(param=param), param
    if (match := _PATH.match(message)) and match["path"] != "body":
        return message, match["path"]
    return message, None


def reshaped(handler: Callable[..., Response[Any]]) -> Callable[..., Response[Any]]:
    """The native handler's answer in OpenAI's shape."""

    def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
        native = handler(request, exc)
        error = msgspec.convert(native.content, dict)["error"]
        message, param = _param_of(error["message"])
        if isinstance(exc, thread_errors.InvalidField):
            param = exc.field
        return openai_response(
            native.status_code,
            message,
            param=param,
            code=error["type"],
            headers=dict(native.headers) or None,
        )

    return handle


def openai_error_handler(request: Request[Any, Any, Any], exc: OpenAIError) -> Response[Any]:
    return openai_response(
        exc.status, exc.message, param=exc.param, code=exc.code, error_type=exc.error_type
    )


OPENAI_EXCEPTION_HANDLERS = {
    OpenAIError: openai_error_handler,
    thread_errors.ThreadsError: reshaped(threads_error_handler),
    TooManyRequestsException: reshaped(rate_limited_handler),
    HTTPException: reshaped(http_exception_handler),
    Exception: reshaped(internal_error_handler),
}
