"""Errors of the OpenAI-shaped routes, with the status and the `param` the SDK reports.

    raise OpenAIError.bad_request("the last input item must be a user message", param="input")

The API layer (app/api/openai/errors.py) writes them as {"error": {message, type, param, code}}.
"""

from __future__ import annotations


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type

    @classmethod
    def bad_request(cls, message: str, *, param: str | None = None, code: str | None = None):
        return cls(400, message, param=param, code=code)

    @classmethod
    def not_found(cls, message: str, *, param: str | None = None, code: str = "not_found"):
        return cls(404, message, param=param, code=code)

    @classmethod
    def conflict(cls, message: str, *, param: str | None = None, code: str = "conflict"):
        return cls(409, message, param=param, code=code)
