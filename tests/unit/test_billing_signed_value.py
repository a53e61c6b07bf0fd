"""The sign-in cookie's token: only the server's secret makes one, and it expires."""

import pytest

from app.billing.signed_value import _b64, _mac, sign, unsign

SECRET = "s" * 32


def test_round_trip_until_it_expires():
    token = sign("kvt_abc:def", SECRET, expires_at=1000)
    assert unsign(token, SECRET, now=999.5) == "kvt_abc:def"
    assert unsign(token, SECRET, now=1000) is None


def test_another_secret_or_any_change_is_refused():
    token = sign("kvt_abc", SECRET, expires_at=1000)
    assert unsign(token, "t" * 32, now=0) is None
    payload, mac = token.split(".")
    forged = sign("kvt_xyz", "t" * 32, expires_at=1000).split(".")[0]
    assert unsign(f"{forged}.{mac}", SECRET, now=0) is None
    other_last = "B" if mac[-1] == "A" else "A"
    assert unsign(f"{payload}.{mac[:-1]}{other_last}", SECRET, now=0) is None
    assert unsign(f"{payload}.{mac[:-2]}", SECRET, now=0) is None


@pytest.mark.parametrize("token", ["", ".", "abc", "abc.def", "é.é", "!!!.xyz"])
def test_garbage_is_refused(token):
    assert unsign(token, SECRET, now=0) is None


def test_a_validly_signed_but_malformed_payload_is_refused():
    for raw in (b"no-colon", b"soon:value", b"\xff\xfe:x"):
        payload = _b64(raw)
        assert unsign(f"{payload}.{_mac(payload, SECRET)}", SECRET, now=0) is None
