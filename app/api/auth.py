"""Bearer-key authentication for /v1: a dependency that yields the caller's account id.

Keys are checked by app/db/accounts.authenticate (the code the CLI's keys commands share): the
SHA-256 of the key must match an unrevoked key. Missing, malformed, unknown and revoked keys all
get the same 401, so the answer does not tell which keys exist.
"""

from __future__ import annotations

from litestar import Request
from litestar.datastructures import State

from app.api.errors import ApiError
from app.db.accounts import authenticate

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="kvthreads"'}


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers=_CHALLENGE)


def bearer_secret(authorization: str | None) -> str:
    if not authorization:
        raise _unauthorized("missing Authorization header; send 'Authorization: Bearer <key>'")
    scheme, _, secret = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise _unauthorized("the Authorization header must be 'Bearer <key>'")
    return secret.strip()


async def provide_account_id(request: Request, state: State) -> str:
    secret = bearer_secret(request.headers.get("authorization"))
    async with state.sessions.begin() as session:
        account = await authenticate(session, secret)
    if account is None:
        raise _unauthorized("invalid or revoked API key")
    return account.id
