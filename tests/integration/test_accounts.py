"""Accounts and API keys (app/db/accounts.py) against the real schema."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from app.db import accounts, ids
from app.db.models import ApiKey

KEY_SHAPE = re.compile(r"kvt_[A-Za-z0-9_-]{43}")


async def test_a_new_key_authenticates_and_only_its_hash_is_stored(
    db_session: AsyncSession,
) -> None:
    made = await accounts.create_account_with_key(db_session, "  acme  ")
    assert KEY_SHAPE.fullmatch(made.secret)
    assert made.account.name == "acme"
    assert ids.has_prefix(made.account.id, ids.ACCOUNT) and ids.has_prefix(made.key.id, ids.API_KEY)
    stored = await db_session.scalar(select(ApiKey).where(ApiKey.id == made.key.id))
    assert stored is not None
    assert stored.key_hash == accounts.hash_key(made.secret) != made.secret
    assert stored.prefix == made.secret[:12]
    assert stored.last_used_at is None

    account = await accounts.authenticate(db_session, made.secret)
    assert account is not None and account.id == made.account.id
    await db_session.refresh(stored)
    assert stored.last_used_at is not None


async def test_wrong_and_revoked_keys_do_not_authenticate(db_session: AsyncSession) -> None:
    made = await accounts.create_account_with_key(db_session, "acme")
    assert await accounts.authenticate(db_session, made.secret[:-1] + "x") is None
    assert await accounts.authenticate(db_session, "not-a-kvt-key") is None
    revoked = await accounts.revoke_key(db_session, made.key.id)
    assert revoked.revoked_at is not None
    assert await accounts.authenticate(db_session, made.secret) is None


async def test_revoke_by_prefix_whole_key_or_id_and_refuse_ambiguity(
    db_session: AsyncSession,
) -> None:
    first = await accounts.create_account_with_key(db_session, "a")
    second = await accounts.create_key(db_session, first.account, "second")
    assert (await accounts.revoke_key(db_session, first.secret)).id == first.key.id
    assert (await accounts.revoke_key(db_session, second.secret[:10])).id == second.key.id
    for suffix in ("1111", "2222"):
        db_session.add(
            ApiKey(
                account_id=first.account.id,
                name=suffix,
                prefix=f"kvt_AAAA{suffix}",
                key_hash=accounts.hash_key(suffix),
            )
        )
    await db_session.flush()
    with pytest.raises(accounts.KeyLookupError, match="2 keys match"):
        await accounts.revoke_key(db_session, "kvt_AAAA")  # ambiguous: never a guess
    with pytest.raises(accounts.KeyLookupError, match="too short"):
        await accounts.revoke_key(db_session, "kvt_")
    with pytest.raises(accounts.KeyLookupError, match="no key matches"):
        await accounts.revoke_key(db_session, "kvt_zzzzzzzz_none")


async def test_an_account_needs_a_name(db_session: AsyncSession) -> None:
    with pytest.raises(ValueError, match="name"):
        await accounts.create_account_with_key(db_session, "   ")


def test_ids_are_prefixed_and_sort_by_time() -> None:
    earlier = ids.new_id(ids.THREAD, now_ms=1_700_000_000_000)
    later = ids.new_id(ids.THREAD, now_ms=1_700_000_000_001)
    assert earlier < later
    assert ids.has_prefix(earlier, ids.THREAD)
    assert not ids.has_prefix(earlier, ids.MESSAGE)
    assert not ids.has_prefix("thr_" + "I" * 26, ids.THREAD)  # I is not a Crockford digit
    assert len({ids.new_id(ids.MESSAGE) for _ in range(1000)}) == 1000
