"""A value with an expiry, signed with HMAC-SHA256 under the server's secret: the billing page's
sign-in form's CSRF token (the signed value is the nonce in the form's cookie).

    token = sign(value, secret, expires_at)     "<base64url(expiry:value)>.<base64url(mac)>"
    unsign(token, secret, now) -> value | None  None: malformed, forged, or expired

The signature proves the server issued the token; it does not hide the value, so never sign a
secret with it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(payload: str, secret: str) -> str:
    return _b64(hmac.new(secret.encode(), payload.encode(), hashlib.sha256).digest())


def sign(value: str, secret: str, expires_at: int) -> str:
    payload = _b64(f"{expires_at}:{value}".encode())
    return f"{payload}.{_mac(payload, secret)}"


def unsign(token: str, secret: str, now: float) -> str | None:
    payload, dot, mac = token.partition(".")
    if not dot or not hmac.compare_digest(mac.encode(), _mac(payload, secret).encode()):
        return None
    try:
        expires_at, colon, value = _unb64(payload).decode().partition(":")
        if not colon or int(expires_at) <= now:
            return None
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    return value
