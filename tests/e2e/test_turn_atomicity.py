"""A turn is all or nothing: failures, cancelled streams and gone clients commit nothing and roll
the engine back; one turn at a time per thread, also across two app instances; idempotent retries.

These use FakeEngine (tests/e2e/fake_engine.py) to inject failures and slow turns down.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.asgi import create_app
from app.db.models import Thread
from app.threads.schemas import AppendMessageRequest
from app.threads.turn import TurnDone
from tests.e2e.fake_engine import FakeEngine, fake_runtime
from tests.e2e.live_server import live_server
from tests.e2e.snapshot import snapshot
from tests.e2e.sse import parse_sse


async def _thread(client) -> str:
    r = await client.post("/v1/threads", json={})
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def _wait_until(predicate, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


async def test_generation_failure_commits_nothing_and_rolls_back(
    fake_api, fake_engine, db_sessions
):
    thread_id = await _thread(fake_api)
    assert (
        await fake_api.post(f"/v1/threads/{thread_id}/messages", json={"content": "a"})
    ).status_code == 200
    cached_before = fake_engine.thread_state(thread_id).cached_tokens
    before = await snapshot(db_sessions)

    fake_engine.fail_after_tokens = 3
    r = await fake_api.post(f"/v1/threads/{thread_id}/messages", json={"content": "b"})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "generation_failed"
    r = await fake_api.post(
        f"/v1/threads/{thread_id}/messages", json={"content": "b", "stream": True}
    )
    assert r.status_code == 200
    assert [e for e, _ in parse_sse(r.text)][-1] == "error"

    assert await snapshot(db_sessions) == before
    assert fake_engine.thread_state(thread_id).cached_tokens == cached_before
    assert not fake_engine.pinned
    fake_engine.fail_after_tokens = None  # and the thread goes on
    assert (
        await fake_api.post(f"/v1/threads/{thread_id}/messages", json={"content": "c"})
    ).status_code == 200


async def test_database_failure_after_generation_rolls_the_engine_back(
    fake_api, fake_engine, db_sessions, db_engine
):
    thread_id = await _thread(fake_api)
    before = await snapshot(db_sessions)
    # Make the ledger insert fail inside the turn's transaction.
    async with db_engine.begin() as conn:
        await conn.exec_driver_sql(
            "ALTER TABLE usage_ledger ADD CONSTRAINT test_no_rows CHECK (input_tokens < 0) NOT VALID"
        )
    r = await fake_api.post(f"/v1/threads/{thread_id}/messages", json={"content": "a"})
    assert r.status_code == 500
    assert await snapshot(db_sessions) == before  # not even the user message
    assert fake_engine.rollbacks == 1 and fake_engine.commits == 0
    assert not fake_engine.pinned
    assert fake_engine.thread_state(thread_id).cached_tokens == 0


async def test_concurrent_appends_one_thread_409_two_threads_both_succeed(open_live, new_key):
    fake_engine = FakeEngine()
    fake_api = await open_live(fake_runtime(fake_engine))
    fake_api.headers["Authorization"] = f"Bearer {await new_key()}"
    one, two = await _thread(fake_api), await _thread(fake_api)
    fake_engine.gate.clear()  # whichever turn starts first stays in flight
    same = [
        asyncio.create_task(fake_api.post(f"/v1/threads/{one}/messages", json={"content": c}))
        for c in ("a", "b")
    ]
    done, _ = await asyncio.wait(same, return_when=asyncio.FIRST_COMPLETED)
    busy = done.pop().result()
    assert busy.status_code == 409, busy.text
    assert busy.json()["error"]["type"] == "thread_busy" and one in busy.json()["error"]["message"]
    fake_engine.gate.set()
    assert sorted([(await task).status_code for task in same]) == [200, 409]
    both = await asyncio.gather(
        fake_api.post(f"/v1/threads/{one}/messages", json={"content": "c"}),
        fake_api.post(f"/v1/threads/{two}/messages", json={"content": "d"}),
    )
    assert [r.status_code for r in both] == [200, 200]
    r = await fake_api.get(f"/v1/threads/{one}")
    assert r.json()["message_count"] == 5  # system + two turns: the 409 wrote nothing


async def test_busy_across_two_app_instances_on_one_database(open_live, new_key, db_sessions):
    slow, other = FakeEngine(), FakeEngine()
    slow.gate.clear()  # its turns stay in flight until the test says
    key = await new_key()
    first = await open_live(fake_runtime(slow))
    second = await open_live(fake_runtime(other))
    for client in (first, second):
        client.headers["Authorization"] = f"Bearer {key}"
    thread_id = await _thread(first)

    running = asyncio.create_task(
        first.post(f"/v1/threads/{thread_id}/messages", json={"content": "slow"})
    )
    await _wait_until(lambda: thread_id in slow.pinned)
    before = await snapshot(db_sessions)
    r = await second.post(f"/v1/threads/{thread_id}/messages", json={"content": "other"})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["type"] == "thread_busy"
    assert not other.pinned and await snapshot(db_sessions) == before
    r = await second.delete(f"/v1/threads/{thread_id}")
    assert r.status_code == 409  # nor is it deleted under the running turn
    slow.gate.set()
    assert (await running).status_code == 200
    # Released: the other instance may run the next turn now.
    r = await second.post(f"/v1/threads/{thread_id}/messages", json={"content": "next"})
    assert r.status_code == 200, r.text
    assert r.json()["cache"]["miss_reason"] == "restarted"  # never held in that process


async def test_cancelled_stream_commits_nothing(open_live, new_key, db_sessions):
    engine = FakeEngine()
    engine.gate_at = 1  # after its first token, a turn waits until the gate opens
    engine.gate.clear()
    client = await open_live(fake_runtime(engine))
    client.headers["Authorization"] = f"Bearer {await new_key()}"
    thread_id = await _thread(client)
    before = await snapshot(db_sessions)
    url = f"/v1/threads/{thread_id}/messages"
    async with client.stream("POST", url, json={"content": "hi", "stream": True}) as r:
        assert r.status_code == 200
        lines = r.aiter_lines()
        assert await anext(lines) == "event: delta"
    # The connection is closed mid-stream: the server cancels the turn.
    await _wait_until(lambda: engine.rollbacks == 1 and not engine.pinned)
    assert engine.commits == 0
    assert await snapshot(db_sessions) == before

    # Same for a plain request whose client gives up before the answer.
    with pytest.raises(httpx.ReadTimeout):
        await client.post(url, json={"content": "hi"}, timeout=0.3)
    await _wait_until(lambda: engine.rollbacks == 2 and not engine.pinned)
    assert await snapshot(db_sessions) == before

    # The thread was unlocked each time: the next turn runs.
    engine.gate.set()
    r = await client.post(url, json={"content": "again"})
    assert r.status_code == 200, r.text
    assert engine.commits == 1


async def test_idempotent_retry_replays_without_running_or_billing(
    fake_api, fake_engine, db_sessions
):
    thread_id = await _thread(fake_api)
    url = f"/v1/threads/{thread_id}/messages"
    key = {"Idempotency-Key": "retry-1"}
    first = await fake_api.post(url, json={"content": "hi"}, headers=key)
    assert first.status_code == 200 and "idempotent-replayed" not in first.headers
    after_first = await snapshot(db_sessions)

    again = await fake_api.post(url, json={"content": "hi"}, headers=key)
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    streamed = await fake_api.post(url, json={"content": "hi", "stream": True}, headers=key)
    events = parse_sse(streamed.text)
    assert events[-1] == ("done", first.json())
    assert (
        "".join(d["text"] for e, d in events if e == "delta") == first.json()["message"]["content"]
    )
    assert fake_engine.commits == 1
    assert await snapshot(db_sessions) == after_first

    reused = await fake_api.post(url, json={"content": "something else"}, headers=key)
    assert reused.status_code == 422
    assert reused.json()["error"]["type"] == "idempotency_key_reused"
    assert await snapshot(db_sessions) == after_first


async def test_server_stopped_mid_turn_commits_nothing(settings, new_key, db_sessions):
    engine = FakeEngine()
    engine.gate_at = 1  # after its first token, a turn waits until the gate opens
    engine.gate.clear()
    app = create_app(settings, fake_runtime(engine))
    headers = {"Authorization": f"Bearer {await new_key()}"}
    with live_server(app, graceful_shutdown_s=0.5) as server:
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30) as client:
            thread_id = await _thread(client)
            before = await snapshot(db_sessions)
            body = {"content": "hi", "stream": True}
            async with client.stream("POST", f"/v1/threads/{thread_id}/messages", json=body) as r:
                lines = r.aiter_lines()
                assert await anext(lines) == "event: delta"
                server.should_exit = True  # Ctrl-C: in-flight turns are cancelled after 0.5 s
                with pytest.raises(httpx.RemoteProtocolError):  # cut off mid-stream
                    async for line in lines:
                        assert line != "event: done"
    assert engine.commits == 0 and engine.rollbacks == 1 and not engine.pinned
    assert await snapshot(db_sessions) == before


async def test_a_nul_the_model_generates_is_stored_as_a_replacement_character(
    fake_api, fake_engine
):
    # PostgreSQL text cannot hold NUL; the token log keeps the exact ids, the text shows U+FFFD.
    fake_engine.reply = "a\x00b"
    thread_id = await _thread(fake_api)
    url = f"/v1/threads/{thread_id}/messages"
    plain = await fake_api.post(url, json={"content": "hi"})
    assert plain.status_code == 200, plain.text
    assert plain.json()["message"]["content"] == "a\ufffdb"
    events = parse_sse((await fake_api.post(url, json={"content": "hi", "stream": True})).text)
    assert "".join(d["text"] for e, d in events if e == "delta") == "a\ufffdb"
    assert events[-1][1]["message"]["content"] == "a\ufffdb"
    log = (await fake_api.get(f"/v1/threads/{thread_id}/tokens")).json()["token_ids"]
    assert log.count(0) == 2


async def test_one_idempotency_key_on_two_threads_at_once_bills_one_turn(
    open_live, new_key, db_sessions
):
    engine = FakeEngine()
    client = await open_live(fake_runtime(engine))
    client.headers["Authorization"] = f"Bearer {await new_key()}"
    one, two = await _thread(client), await _thread(client)
    engine.gate.clear()  # both turns in flight together: neither finds the other's ledger row
    key = {"Idempotency-Key": "shared"}
    turns = [
        asyncio.create_task(
            client.post(f"/v1/threads/{t}/messages", json={"content": "hi"}, headers=key)
        )
        for t in (one, two)
    ]
    await _wait_until(lambda: len(engine.pinned) == 2)
    engine.gate.set()
    results = sorted([await t for t in turns], key=lambda r: r.status_code)
    assert [r.status_code for r in results] == [200, 409]
    assert results[1].json()["error"]["type"] == "idempotency_conflict"
    assert engine.commits == 1 and engine.rollbacks == 1 and not engine.pinned
    counts = [(await client.get(f"/v1/threads/{t}")).json()["message_count"] for t in (one, two)]
    assert sorted(counts) == [1, 3]  # the loser wrote nothing


async def test_more_turns_in_flight_than_pooled_connections_all_finish(open_live, new_key):
    # A turn holds exactly one connection (its lock's) and does its reads and its write on it,
    # so turns waiting for the pool never block turns that hold one (20 = pool size + overflow).
    engine = FakeEngine()
    client = await open_live(fake_runtime(engine), max_turns_in_flight=24)
    client.headers["Authorization"] = f"Bearer {await new_key()}"
    threads = [await _thread(client) for _ in range(24)]
    engine.gate.clear()
    turns = [
        asyncio.create_task(client.post(f"/v1/threads/{t}/messages", json={"content": "hi"}))
        for t in threads
    ]
    await _wait_until(lambda: len(engine.pinned) == 20)
    engine.gate.set()
    assert [(await t).status_code for t in turns] == [200] * 24
    assert engine.commits == 24


async def test_thread_is_unlocked_when_done_is_delivered(fake_api, db_sessions):
    """A client may send its next turn the moment it reads `done`, before the stream ends: the
    thread's lock is released before the final event is handed out, not when the stream closes."""
    thread_id = await _thread(fake_api)
    components = fake_api.app.state.threads
    async with db_sessions() as session:
        account_id = (await session.get(Thread, thread_id)).account_id
    request = AppendMessageRequest(content="hi")

    async def run_turn() -> None:  # on the app's own event loop, as a request would
        turn = await components.turns.begin(account_id, thread_id, request, None)
        try:
            assert components.locks.is_in_flight(thread_id)
            async for event in turn.events():
                if isinstance(event, TurnDone):
                    assert not components.locks.is_in_flight(thread_id)
                    return
            raise AssertionError("the turn ended without its result")
        finally:
            await turn.close()

    await asyncio.to_thread(fake_api.blocking_portal.call, run_turn)
