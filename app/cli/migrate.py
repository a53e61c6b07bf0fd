"""`migrate`: bring the database's schema to the newest Alembic revision."""

from __future__ import annotations

import argparse
import asyncio
import sys

from app.cli.errors import check_database, database_label
from app.config import Settings
from app.db import migrate
from app.db.session import create_engine


async def _upgrade(url: str) -> str | None:
    engine = create_engine(url, pool_size=1)
    try:
        await migrate.upgrade(engine)
        return await migrate.current_revision(engine)
    finally:
        await engine.dispose()


def run_migrations(settings: Settings) -> int:
    url = check_database(settings, migrated=False)
    revision = asyncio.run(_upgrade(url))
    print(f"kvthreads: database {database_label(url)} is at revision {revision}", file=sys.stderr)
    return 0


def _handle(settings: Settings, args: argparse.Namespace) -> int:
    return run_migrations(settings)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "migrate", help="upgrade the database schema to the newest revision"
    )
    parser.set_defaults(handler=_handle)
