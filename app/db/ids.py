"""Readable, time-ordered string ids: `thr_01J9Z3K5...` (a prefix and 26 Crockford base32 chars).

The 26 chars are a ULID: 48 bits of milliseconds since the epoch, then 80 random bits, so ids of
one kind sort by creation time (a stable tie-break for cursor pages) and never collide in practice.
"""

from __future__ import annotations

import secrets
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
ID_BODY_LENGTH = 26

ACCOUNT = "acct"
API_KEY = "key"
THREAD = "thr"
MESSAGE = "msg"
USAGE = "usg"
BILLING_SESSION = "bss"


def new_id(prefix: str, *, now_ms: int | None = None) -> str:
    ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    value = (ms << 80) | secrets.randbits(80)  # 128 bits -> 26 base32 chars (130 bits)
    chars = []
    for _ in range(ID_BODY_LENGTH):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"


def has_prefix(value: str, prefix: str) -> bool:
    """Whether `value` is shaped like an id of this kind (cheap check before a lookup)."""
    head, sep, body = value.partition("_")
    return (
        sep == "_"
        and head == prefix
        and len(body) == ID_BODY_LENGTH
        and all(c in _CROCKFORD for c in body)
    )
