"""`keys create --name NAME`, `keys list`, `keys revoke KEY_ID_OR_PREFIX`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from app.cli.errors import CliError, check_database
from app.config import Settings
from app.db import accounts
from app.db.session import create_engine, create_session_factory

T = TypeVar("T")


def _in_session(url: str, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    async def run() -> T:
        engine = create_engine(url, pool_size=1)
        try:
            async with create_session_factory(engine)() as session, session.begin():
                return await work(session)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _create(settings: Settings, args: argparse.Namespace) -> int:
    if not args.name.strip():
        raise CliError("--name must not be empty", 2)
    url = check_database(settings, migrated=True)
    made = _in_session(url, lambda s: accounts.create_account_with_key(s, args.name))
    print(
        f"kvthreads: account {made.account.id} ({made.account.name}), key {made.key.id}. "
        "The key below is shown once; keep it.",
        file=sys.stderr,
    )
    print(made.secret)
    return 0


def _list(settings: Settings, args: argparse.Namespace) -> int:
    url = check_database(settings, migrated=True)
    rows = _in_session(url, accounts.list_keys)
    print(f"{'key id':32} {'prefix':14} {'status':8} {'account':32} name")
    for key, account in rows:
        status = "revoked" if key.revoked_at else "active"
        print(f"{key.id:32} {key.prefix + '…':14} {status:8} {account.id:32} {account.name}")
    return 0


def _revoke(settings: Settings, args: argparse.Namespace) -> int:
    url = check_database(settings, migrated=True)
    try:
        key = _in_session(url, lambda s: accounts.revoke_key(s, args.key))
    except accounts.KeyLookupError as exc:
        raise CliError(str(exc)) from None
    print(
        f"kvthreads: key {key.id} ({key.prefix}…) revoked at {key.revoked_at:%Y-%m-%d %H:%M:%S %Z}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keys", help="make, list and revoke API keys")
    actions = parser.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="make an account and its key (printed once)")
    create.add_argument("--name", required=True, help="the account's name")
    create.set_defaults(handler=_create)
    listing = actions.add_parser("list", help="every key, active and revoked")
    listing.set_defaults(handler=_list)
    revoke = actions.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key", metavar="KEY_ID_OR_PREFIX", help="key id, the key, or its prefix")
    revoke.set_defaults(handler=_revoke)
