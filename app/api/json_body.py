"""Request bodies are strict JSON: the /v1 router's request class decodes them.

    Router(..., request_class=JSONRequest)   # then `data: JSONBody[SomeStruct]` as usual

Litestar would take any content type as JSON, raise a RecursionError on deep nesting and a
UnicodeDecodeError on invalid UTF-8 (500s), keep the last of duplicate keys, and convert the body
to the handler's type leniently ("16" becomes 16). Here the body must be
`Content-Type: application/json` (else 415), valid UTF-8 JSON without duplicate keys, and it is
decoded straight into the handler's `data` type with msgspec's strict rules; anything else is a
400 whose message names the problem. Litestar passes the decoded struct through unchanged.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
from litestar import Request
from litestar.types import Empty

from app.api.errors import ApiError

JSON_MEDIA_TYPE = "application/json"


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_request", message)


def is_json_media_type(media_type: str) -> bool:
    """application/json, or a structured +json type (application/merge-patch+json)."""
    return media_type == JSON_MEDIA_TYPE or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


def validation_message(exc: msgspec.ValidationError) -> str:
    """msgspec's "Expected `int`, got `str` - at `$.max_tokens`" as "max_tokens: expected ..."."""
    text = str(exc)
    what, sep, where = text.rpartition(" - at `$")
    if not sep:
        return text[:1].lower() + text[1:]
    path = where.rstrip("`").removeprefix(".")
    return f"{path or 'body'}: {what[:1].lower()}{what[1:]}"


def decode_json_body(media_type: str, body: bytes, target: Any) -> Any:
    """The body as `target`, or an ApiError (415, 400) that says what is wrong with it."""
    if not is_json_media_type(media_type):
        got = f"got {media_type!r}" if media_type else "no Content-Type was sent"
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the body as JSON with 'Content-Type: {JSON_MEDIA_TYPE}' ({got})",
        )
    if not body:
        raise _invalid("the request body is empty: send a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _invalid(f"the body is not valid UTF-8 (byte {exc.start})") from None
    # A first pass with the standard library: it sees every object's pairs (msgspec keeps the last
    # of duplicate keys without a word), and a RecursionError here is just a body nested too deep.
    try:
        json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as exc:
        raise _invalid(f"the key {exc.key!r} appears twice in one JSON object") from None
    except RecursionError:
        raise _invalid("the JSON is nested too deeply") from None
    except ValueError as exc:
        raise _invalid(f"the body is not valid JSON: {exc}") from None
    try:
        return msgspec.json.decode(body, type=target, strict=True)
    except msgspec.ValidationError as exc:
        raise _invalid(validation_message(exc)) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        # What the standard library lets through: NaN, Infinity, unpaired UTF-16 surrogates.
        raise _invalid(f"the body is not valid JSON: {exc}") from None


class JSONRequest(Request):
    """A Request whose `json()` is `decode_json_body` into the route's `data` type."""

    async def json(self) -> Any:
        if self._json is Empty:
            data_field = self.route_handler.parsed_data_field
            target = Any if data_field is None else data_field.annotation
            self._json = decode_json_body(self.content_type[0], await self.body(), target)
        return self._json
