"""Sign-ins of the billing page, kept server-side.

    token = await start_session(session, api_key_secret, ttl_seconds)  # None: bad or revoked key
    account_id = await session_account(session, token)  # None: unknown, expired, ended, revoked key
    await end_session(session, token)                   # sign-out: the token stops working

The cookie holds only `token`: 256 random bits that name the sign-in and carry nothing of the API
key. The table keeps its SHA-256 (enough for a long random secret), the key it was made with and
when it expires. A session counts while it is unexpired and unended and its key is unrevoked;
revoking a key also ends its sessions (app/db/accounts.revoke_key).
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from app.db.accounts import active_key, hash_key
from app.db.models import ApiKey, BillingSession


def new_session_token() -> str:
    return secrets.token_urlsafe(32)


async def start_session(session: AsyncSession, secret: str, ttl_seconds: int) -> str | None:
    """A new sign-in for the key `secret`, or None if the key is not active."""
    found = await active_key(session, secret)
    if found is None:
        return None
    key, account = found
    token = new_session_token()
    session.add(
        BillingSession(
            token_hash=hash_key(token),
            account_id=account.id,
            api_key_id=key.id,
            expires_at=func.now() + timedelta(seconds=ttl_seconds),
        )
    )
    await session.flush()
    return token


async def session_account(session: AsyncSession, token: str) -> str | None:
    """The account signed in with `token`, or None."""
    return await session.scalar(
        select(BillingSession.account_id)
        .join(ApiKey, ApiKey.id == BillingSession.api_key_id)
        .where(
            BillingSession.token_hash == hash_key(token),
            BillingSession.revoked_at.is_(None),
            BillingSession.expires_at > func.now(),
            ApiKey.revoked_at.is_(None),
        )
    )


async def end_session(session: AsyncSession, token: str) -> None:
    await session.execute(
        update(BillingSession)
        .where(BillingSession.token_hash == hash_key(token), BillingSession.revoked_at.is_(None))
        .values(revoked_at=func.now())
    )
