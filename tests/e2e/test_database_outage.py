"""The database stops answering (frozen with SIGSTOP) or goes down, with turns in flight.

Every request then gets a 503 `database_unavailable` with Retry-After within a few seconds (the
timeouts are set to 1 s here), not a hang and not a 500; once the database is back the same
server process serves again, no acknowledged turn is lost and no half-written one exists.

Each test runs its own throwaway cluster (about 3 s to make), since it freezes or stops it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import pool, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from app.asgi import create_app
from app.config import load_settings
from app.db import migrate
from app.db.accounts import create_account_with_key
from app.db.session import create_session_factory
from devtools.postgres.cluster import LocalCluster
from devtools.postgres.throwaway import throwaway_cluster
from tests.e2e.fake_engine import FakeEngine, fake_runtime
from tests.e2e.live_server import live_server
from tests.e2e.sse import parse_sse
from tests.e2e.turn_log_check import assert_no_half_turns
from tests.pgfaults import frozen

TIMEOUTS = {
    "KVTHREADS_DB_CONNECT_TIMEOUT_S": "1",
    "KVTHREADS_DB_POOL_TIMEOUT_S": "1",
    "KVTHREADS_DB_STATEMENT_TIMEOUT_S": "1",
}
BOUND_S = 8.0  # "a few seconds": a timed-out statement, a reconnect and the driver's close


@dataclass
class Outage:
    cluster: LocalCluster
    engine: FakeEngine
    client: httpx.AsyncClient
    sessions: async_sessionmaker[AsyncSession]


@pytest.fixture
async def outage() -> AsyncIterator[Outage]:
    with throwaway_cluster() as cluster:
        db = create_async_engine(cluster.url(), poolclass=pool.NullPool)
        try:
            await migrate.upgrade(db)
            async with db.execution_options(isolation_level="AUTOCOMMIT").connect() as conn:
                # Throwaway clusters trade durability for speed (devtools/postgres/throwaway.py); this one must
                # keep every acknowledged commit through an immediate shutdown.
                await conn.execute(text("ALTER SYSTEM SET synchronous_commit = on"))
                await conn.execute(text("SELECT pg_reload_conf()"))
            sessions = create_session_factory(db)
            async with sessions.begin() as session:
                key = (await create_account_with_key(session, "outage")).secret
            engine = FakeEngine()
            settings = load_settings({"DATABASE_URL": cluster.url(), **TIMEOUTS})
            with live_server(create_app(settings, fake_runtime(engine))) as server:
                headers = {"Authorization": f"Bearer {key}"}
                async with httpx.AsyncClient(
                    base_url=server.url, headers=headers, timeout=60
                ) as client:
                    yield Outage(cluster, engine, client, sessions)
        finally:
            await db.dispose()


async def _timed(request: Awaitable[httpx.Response]) -> tuple[httpx.Response, float]:
    start = time.monotonic()
    response = await request
    return response, time.monotonic() - start


def _assert_unavailable(r: httpx.Response, elapsed: float) -> None:
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "database_unavailable", r.text
    assert int(r.headers["Retry-After"]) > 0
    assert elapsed < BOUND_S, elapsed


async def _eventually(
    request: Callable[[], Awaitable[httpx.Response]], status: int, timeout_s: float = 20
) -> httpx.Response:
    """The database just came back: the first tries may still find it busy."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = await request()
        if r.status_code == status or time.monotonic() > deadline:
            assert r.status_code == status, r.text
            return r
        await asyncio.sleep(0.2)


async def _turn(client: httpx.AsyncClient, thread_id: str, content: str, **extra) -> httpx.Response:
    return await client.post(
        f"/v1/threads/{thread_id}/messages", json={"content": content, "max_tokens": 8, **extra}
    )


async def _start_turns_in_flight(o: Outage) -> tuple[list[str], asyncio.Task, asyncio.Task]:
    """Two threads with one acknowledged turn each, then a turn on each held mid-generation."""
    thread_ids, acked = [], []
    for _ in range(2):
        r = await o.client.post("/v1/threads", json={})
        assert r.status_code == 201, r.text
        thread_ids.append(r.json()["id"])
        r = await _turn(o.client, thread_ids[-1], "before")
        assert r.status_code == 200, r.text
        acked.append(r.json()["message"]["id"])
    o.engine.gate_at = 2
    o.engine.gate.clear()
    plain = asyncio.create_task(_turn(o.client, thread_ids[0], "during"))
    streamed = asyncio.create_task(_turn(o.client, thread_ids[1], "during", stream=True))
    deadline = time.monotonic() + 20
    while len(o.engine.pinned) < 2:
        assert time.monotonic() < deadline, "the turns did not start"
        await asyncio.sleep(0.01)
    return acked, plain, streamed


async def _assert_in_flight_turns_failed(plain: asyncio.Task, streamed: asyncio.Task) -> None:
    start = time.monotonic()
    r = await plain
    _assert_unavailable(r, time.monotonic() - start)
    r = await streamed
    assert r.status_code == 200  # the stream had begun; its last event says what happened
    event, data = parse_sse(r.text)[-1]
    assert event == "error" and data["error"]["type"] == "database_unavailable", r.text
    assert time.monotonic() - start < 2 * BOUND_S


async def _assert_unavailable_everywhere(client: httpx.AsyncClient, thread_id: str) -> None:
    requests = [
        client.get("/v1/threads"),
        client.get("/v1/threads", headers={"Authorization": "Bearer kvt_not_a_key"}),
        client.post("/v1/threads", json={}),
        _turn(client, thread_id, "while down"),
        _turn(client, thread_id, "while down", stream=True),
    ]
    for request in requests:
        _assert_unavailable(*await _timed(request))
    r, elapsed = await _timed(client.get("/healthz"))
    assert r.status_code == 503 and elapsed < BOUND_S


async def _assert_recovered(o: Outage, thread_ids: list[str], acked: list[str]) -> None:
    for thread_id in thread_ids:
        r = await _eventually(lambda t=thread_id: _turn(o.client, t, "after"), 200)
        acked.append(r.json()["message"]["id"])
    assert (await o.client.get("/healthz")).status_code == 200
    stored = await assert_no_half_turns(o.sessions)
    assert set(acked) <= stored  # nothing acknowledged is lost


async def test_frozen_database_answers_503_quickly_and_recovers_without_restart(outage):
    o = outage
    acked, plain, streamed = await _start_turns_in_flight(o)
    thread_ids = list(o.engine.pinned)
    with frozen(o.cluster):
        o.engine.gate.set()  # the turns finish generating and try to commit
        await _assert_in_flight_turns_failed(plain, streamed)
        await _assert_unavailable_everywhere(o.client, thread_ids[0])
    assert not o.engine.pinned  # both turns rolled the engine back
    await _assert_recovered(o, thread_ids, acked)


async def test_stopped_database_answers_503_and_recovers_after_its_restart(outage):
    o = outage
    acked, plain, streamed = await _start_turns_in_flight(o)
    thread_ids = list(o.engine.pinned)
    o.cluster.stop()
    try:
        o.engine.gate.set()
        await _assert_in_flight_turns_failed(plain, streamed)
        await _assert_unavailable_everywhere(o.client, thread_ids[0])
    finally:
        o.cluster.start()
    assert not o.engine.pinned
    await _assert_recovered(o, thread_ids, acked)
