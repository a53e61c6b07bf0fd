"""Accounts and their API keys.

A key is `kvt_` + 43 URL-safe characters (256 random bits). It is shown once, when made; the
database keeps its SHA-256 (a fast hash is enough for long random secrets) and a short prefix that
tells keys apart in listings.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.models import Account, ApiKey, BillingSession

KEY_PREFIX = "kvt_"
DISPLAY_PREFIX_LENGTH = 12  # "kvt_" + 8 chars


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class NewKey:
    account: Account
    key: ApiKey
    secret: str  # the only time the full key exists outside the client


class KeyLookupError(LookupError):
    """No key, or more than one, matches what the caller named."""


async def create_account_with_key(
    session: AsyncSession, name: str, key_name: str = "default"
) -> NewKey:
    """A new account and its first key (flushed, not committed: the caller owns the transaction)."""
    if not name.strip():
        raise ValueError("an account needs a name")
    account = Account(name=name.strip())
    session.add(account)
    await session.flush()
    return await create_key(session, account, key_name)


async def create_key(session: AsyncSession, account: Account, name: str = "default") -> NewKey:
    secret = new_key_secret()
    key = ApiKey(
        account_id=account.id,
        name=name,
        prefix=secret[:DISPLAY_PREFIX_LENGTH],
        key_hash=hash_key(secret),
    )
    session.add(key)
    await session.flush()
    return NewKey(account=account, key=key, secret=secret)


async def active_key(session: AsyncSession, secret: str) -> tuple[ApiKey, Account] | None:
    """The active (unrevoked) key `secret` and its account, or None; marks the key as used."""
    if not secret.startswith(KEY_PREFIX):
        return None
    row = (
        await session.execute(
            select(ApiKey, Account)
            .join(Account, Account.id == ApiKey.account_id)
            .where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None))
        )
    ).first()
    if row is None:
        return None
    key, account = row
    await session.execute(update(ApiKey).where(ApiKey.id == key.id).values(last_used_at=func.now()))
    return key, account


async def authenticate(session: AsyncSession, secret: str) -> Account | None:
    """The account of an active key, or None; marks the key as used."""
    found = await active_key(session, secret)
    return None if found is None else found[1]


async def list_keys(session: AsyncSession) -> list[tuple[ApiKey, Account]]:
    rows = await session.execute(
        select(ApiKey, Account)
        .join(Account, Account.id == ApiKey.account_id)
        .order_by(ApiKey.created_at, ApiKey.id)
    )
    return [(key, account) for key, account in rows.tuples()]


async def revoke_key(session: AsyncSession, id_or_prefix: str) -> ApiKey:
    """Revoke the one key named by its id, the whole key, or the start of its display prefix."""
    if len(id_or_prefix) < len(KEY_PREFIX) + 4:
        raise KeyLookupError(f"{id_or_prefix!r} is too short to name a key")
    keys = (
        await session.scalars(
            select(ApiKey).where(
                or_(
                    ApiKey.id == id_or_prefix,
                    ApiKey.key_hash == hash_key(id_or_prefix),
                    ApiKey.prefix.startswith(id_or_prefix, autoescape=True),
                )
            )
        )
    ).all()
    if not keys:
        raise KeyLookupError(f"no key matches {id_or_prefix!r}")
    if len(keys) > 1:
        raise KeyLookupError(
            f"{len(keys)} keys match {id_or_prefix!r}; give more of it or the key id"
        )
    key = keys[0]
    if key.revoked_at is None:
        await session.execute(
            update(ApiKey).where(ApiKey.id == key.id).values(revoked_at=func.now())
        )
        await session.refresh(key)
    # The billing page's sign-ins made with this key end with it (they also stop counting the
    # moment the key is revoked: session_account checks the key).
    await session.execute(
        update(BillingSession)
        .where(BillingSession.api_key_id == key.id, BillingSession.revoked_at.is_(None))
        .values(revoked_at=func.now())
    )
    return key
