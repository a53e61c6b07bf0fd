"""Opaque page cursors: the sort key of the last row of a page, base64url-encoded JSON.

Clients pass `next_cursor` back as `after`; they never parse it. A cursor that does not decode is a
400 naming the `after` parameter.
"""

from __future__ import annotations

import base64
import binascii
import json

from app.threads.errors import InvalidField


def encode_cursor(*key: str | int) -> str:
    raw = json.dumps(list(key), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(cursor: str, types: tuple[type, ...]) -> tuple:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        key = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidField("after", "not a cursor this API returned") from None
    if (
        not isinstance(key, list)
        or len(key) != len(types)
        or not all(type(v) is t for v, t in zip(key, types, strict=True))
    ):
        raise InvalidField("after", "not a cursor this API returned")
    return tuple(key)
