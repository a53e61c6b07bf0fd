"""Limits: requests per key, sign-in attempts per address, turns in flight and monthly budgets per
account. Each refusal is a 429 with Retry-After and an error type naming the limit."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

from app.billing.prices import UnitPrices
from app.db.accounts import authenticate
from app.threads.quotas import month_bounds
from tests.billing_ledger import add_turn
from tests.e2e.fake_engine import FakeEngine, fake_runtime

PRICES = UnitPrices(Decimal("1"), Decimal("0"), Decimal("2"))


def _assert_429(r, error_type: str) -> None:
    assert r.status_code == 429, r.text
    assert r.json()["error"]["type"] == error_type
    assert int(r.headers["retry-after"]) >= 1


async def _thread(client, **headers) -> str:
    r = await client.post("/v1/threads", json={}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def _wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


async def test_requests_over_the_rate_are_refused_per_key(open_api, fake_engine, new_key):
    client = await open_api(fake_runtime(fake_engine), rate_limit_per_minute=5)
    alice = {"Authorization": f"Bearer {await new_key('alice')}"}
    bob = {"Authorization": f"Bearer {await new_key('bob')}"}
    for _ in range(5):
        assert (await client.get("/v1/threads", headers=alice)).status_code == 200
    r = await client.get("/v1/threads", headers=alice)
    _assert_429(r, "rate_limited")
    assert r.headers["ratelimit-limit"] == "5"
    assert r.headers["cache-control"] == "no-store"
    assert (await client.post("/v1/threads", json={}, headers=alice)).status_code == 429
    assert (await client.get("/v1/threads", headers=bob)).status_code == 200  # its own bucket
    assert (await client.get("/healthz")).status_code == 200  # outside /v1: not counted


async def test_sign_in_attempts_are_limited_per_address(open_api, fake_engine, new_key):
    client = await open_api(fake_runtime(fake_engine), sign_in_limit_per_minute=3)
    client.base_url = "https://testserver.local"
    for _ in range(3):
        r = await client.post("/billing/sign-in", data={"api_key": "kvt_guess"})
        assert r.status_code == 403  # no form token, but counted all the same
    r = await client.post("/billing/sign-in", data={"api_key": await new_key()})
    _assert_429(r, "rate_limited")
    assert (await client.get("/billing")).status_code == 200  # only sign-in posts count


async def test_turns_in_flight_are_capped_per_account(open_live, new_key):
    engine = FakeEngine()
    client = await open_live(fake_runtime(engine), max_turns_in_flight=2)
    alice = {"Authorization": f"Bearer {await new_key('alice')}"}
    bob = {"Authorization": f"Bearer {await new_key('bob')}"}
    client.headers.update(alice)
    threads = [await _thread(client) for _ in range(3)]
    bobs = await _thread(client, **bob)
    engine.gate.clear()
    running = [
        asyncio.create_task(client.post(f"/v1/threads/{t}/messages", json={"content": "hi"}))
        for t in threads[:2]
    ]
    try:
        await _wait_until(lambda: len(engine.pinned) == 2)
        r = await client.post(f"/v1/threads/{threads[2]}/messages", json={"content": "hi"})
        _assert_429(r, "too_many_turns_in_flight")
        # Another account has slots of its own.
        other = client.post(f"/v1/threads/{bobs}/messages", json={"content": "hi"}, headers=bob)
        bob_turn = asyncio.create_task(other)
        await _wait_until(lambda: len(engine.pinned) == 3)
    finally:
        engine.gate.set()
    assert [(await t).status_code for t in running] == [200, 200]
    assert (await bob_turn).status_code == 200
    r = await client.post(f"/v1/threads/{threads[2]}/messages", json={"content": "hi"})
    assert r.status_code == 200, r.text  # the slots came back


async def _spent(db_sessions, key: str, *, fresh: int, output: int, at: datetime) -> None:
    async with db_sessions.begin() as session:
        account_id = (await authenticate(session, key)).id
        add_turn(session, account_id=account_id, thread_id=None, model="m", cached=0,
                 fresh=fresh, output=output, prices=PRICES, at=at)  # fmt: skip


async def test_a_monthly_token_budget_refuses_turns_once_used_up(open_api, fake_engine, new_key, db_sessions):  # fmt: skip
    client = await open_api(fake_runtime(fake_engine), monthly_token_budget=1000)
    key = await new_key()
    client.headers["Authorization"] = f"Bearer {key}"
    thread = await _thread(client)
    start, _ = month_bounds(datetime.now(UTC))
    # Last month's turns do not count; this month's 999 tokens leave room for one turn.
    await _spent(db_sessions, key, fresh=5000, output=0, at=start - timedelta(seconds=1))
    await _spent(db_sessions, key, fresh=900, output=99, at=start)
    r = await client.post(f"/v1/threads/{thread}/messages", json={"content": "hi"})
    assert r.status_code == 200, r.text
    r = await client.post(f"/v1/threads/{thread}/messages", json={"content": "hi"})
    _assert_429(r, "budget_exceeded")
    assert "tokens" in r.json()["error"]["message"]
    assert int(r.headers["retry-after"]) <= 31 * 86400


async def test_a_monthly_spend_budget_refuses_turns_once_used_up(open_api, fake_engine, new_key, db_sessions):  # fmt: skip
    client = await open_api(fake_runtime(fake_engine), monthly_spend_budget=Decimal("0.001"))
    key = await new_key()
    client.headers["Authorization"] = f"Bearer {key}"
    thread = await _thread(client)
    await _spent(db_sessions, key, fresh=1000, output=0, at=datetime.now(UTC))  # 0.001 exactly
    r = await client.post(f"/v1/threads/{thread}/messages", json={"content": "hi"})
    _assert_429(r, "budget_exceeded")
    assert "spend" in r.json()["error"]["message"]


def test_month_bounds_roll_over_the_year():
    start, end = month_bounds(datetime(2026, 12, 31, 23, 59, tzinfo=UTC))
    assert (start, end) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    # 00:30 on March 1 at UTC+1 is still February in UTC.
    start, end = month_bounds(datetime(2026, 3, 1, 0, 30, tzinfo=timezone(timedelta(hours=1))))
    assert (start, end) == (datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC))
