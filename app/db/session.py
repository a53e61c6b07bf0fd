"""The async engine and session factory the service shares (one pool per process)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.config import Settings


@dataclass(frozen=True)
class DatabaseTimeouts:
    connect_s: float  # opening a connection (TCP and Postgres' startup)
    pool_s: float  # waiting for a pooled connection when all are in use
    statement_s: float  # one statement (client side and server side)


def database_timeouts(settings: Settings) -> DatabaseTimeouts:
    return DatabaseTimeouts(
        connect_s=settings.db_connect_timeout_s,
        pool_s=settings.db_pool_timeout_s,
        statement_s=settings.db_statement_timeout_s,
    )


def create_engine(
    database_url: str,
    *,
    pool_size: int = 10,
    echo: bool = False,
    timeouts: DatabaseTimeouts | None = None,
) -> AsyncEngine:
    """An engine for a postgresql+asyncpg:// URL (Settings.database_url is already normalised).

    pool_pre_ping drops connections that died while idle (a database restart), so the first
    request after one does not fail. `timeouts` bound every wait on the database (the service
    passes the settings'); without them a database that stops answering hangs its callers.
    """
    connect_args: dict[str, Any] = {}
    pool_args: dict[str, Any] = {}
    if timeouts is not None:
        connect_args = {
            "timeout": timeouts.connect_s,
            # Client side: an answer that never comes (a frozen server) raises TimeoutError.
            "command_timeout": timeouts.statement_s,
            # Server side too, so that Postgres stops the work nobody waits for any more.
            "server_settings": {"statement_timeout": str(int(timeouts.statement_s * 1000))},
        }
        pool_args = {"pool_timeout": timeouts.pool_s}
    return create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        echo=echo,
        connect_args=connect_args,
        **pool_args,
    )


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    # expire_on_commit=False: objects stay readable after commit, to build the response from.
    return async_sessionmaker(engine, expire_on_commit=False)


async def ping(engine: AsyncEngine) -> None:
    """Round-trip to the database; raises when it is unreachable."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
