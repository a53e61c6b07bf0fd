"""Fixtures for the HTTP tests: API keys made by the CLI's code, apps on the real Postgres.

new_key(name)        an account and its key (app.db.accounts, as `python -m app keys create`)
fake_engine          a FakeEngine (tests/e2e/fake_engine.py), for failure injection
open_api(runtime)    an AsyncTestClient on create_app(settings, runtime), lifespan started
open_live(runtime)   the same app served by uvicorn in a thread; an httpx.AsyncClient on it.
                     Litestar's test client runs requests one at a time, so tests of
                     concurrent requests or of dropped connections use this one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, ExitStack
from dataclasses import replace

import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.asgi import create_app
from app.config import Settings
from app.db.accounts import create_account_with_key
from tests.e2e.fake_engine import FakeEngine, fake_runtime
from tests.e2e.live_server import live_server


@pytest.fixture
def new_key(db_sessions: async_sessionmaker[AsyncSession]) -> Callable[[str], Awaitable[str]]:
    async def make(name: str = "tester") -> str:
        async with db_sessions.begin() as session:
            return (await create_account_with_key(session, name)).secret

    return make


@pytest.fixture
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
async def open_api(settings: Settings) -> AsyncIterator[Callable[..., Awaitable[AsyncTestClient]]]:
    async with AsyncExitStack() as stack:

        async def open_client(runtime=None, **overrides) -> AsyncTestClient:
            app = create_app(replace(settings, **overrides), runtime)
            return await stack.enter_async_context(AsyncTestClient(app=app))

        yield open_client


@pytest.fixture
async def open_live(settings: Settings) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    with ExitStack() as servers:
        async with AsyncExitStack() as clients:

            async def open_client(runtime=None, **overrides) -> httpx.AsyncClient:
                app = create_app(replace(settings, **overrides), runtime)
                server = servers.enter_context(live_server(app))
                client = httpx.AsyncClient(base_url=server.url, timeout=60)
                return await clients.enter_async_context(client)

            yield open_client


@pytest.fixture
async def fake_api(open_api, fake_engine: FakeEngine, new_key) -> AsyncTestClient:
    client = await open_api(fake_runtime(fake_engine))
    client.headers["Authorization"] = f"Bearer {await new_key()}"
    return client
