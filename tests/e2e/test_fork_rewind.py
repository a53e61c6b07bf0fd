"""Fork and rewind over HTTP, and shared prefixes between threads, on the real engine (the
built-in tiny model) where KV matters, on the fake engine where a turn must stay in flight."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

from app.db import models
from tests.e2e.fake_engine import FakeEngine, fake_runtime

ENGINE = {"model": "builtin-tiny-random", "device": "cpu", "kv_cache_mb": 4}
GREEDY = {"temperature": 0, "max_tokens": 8}
SYSTEM = "You answer in one short sentence. " * 4  # several full KV blocks


@pytest.fixture
async def api(open_api, new_key):
    client = await open_api(**ENGINE)
    client.headers["Authorization"] = f"Bearer {await new_key()}"
    return client


async def _thread(client, system=SYSTEM, headers=None) -> str:
    r = await client.post("/v1/threads", json={"system": system}, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def _talk(client, thread_id, content, headers=None) -> dict:
    r = await client.post(
        f"/v1/threads/{thread_id}/messages",
        json={"content": content, **GREEDY},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    return r.json()


async def _tokens(client, thread_id) -> list[int]:
    return (await client.get(f"/v1/threads/{thread_id}/tokens")).json()["token_ids"]


async def test_a_fork_shares_the_parents_kv_and_answers_as_the_parent_would(api):
    parent = await _thread(api)
    for content in ("Hello.", "Tell me more."):
        await _talk(api, parent, content)
    r = await api.post(f"/v1/threads/{parent}/fork", json={"metadata": {"branch": "b"}})
    assert r.status_code == 201, r.text
    child = r.json()
    assert child["id"] != parent and child["metadata"] == {"branch": "b"}
    assert (child["message_count"], child["system"]) == (5, SYSTEM)
    assert child["cache"]["resident"] is True and child["cache"]["shared_tokens"] > 0
    assert await _tokens(api, child["id"]) == await _tokens(api, parent)
    messages = (await api.get(f"/v1/threads/{child['id']}/messages")).json()["data"]
    assert [m["content"] for m in messages[1:4:2]] == ["Hello.", "Tell me more."]

    # Its first turn is a cache hit computing what the parent's next turn would compute.
    from_child = await _talk(api, child["id"], "Why?")
    from_parent = await _talk(api, parent, "Why?")
    assert from_child["cache"]["hit"] is True
    assert from_child["usage"] == from_parent["usage"]
    assert from_child["message"]["content"] == from_parent["message"]["content"]
    assert from_child["cache"]["shared_tokens"] > 0


async def test_fork_at_a_position_and_a_fork_of_a_fork(api):
    parent = await _thread(api)
    await _talk(api, parent, "Hello.")
    await _talk(api, parent, "Tell me more.")
    at_two = (await api.post(f"/v1/threads/{parent}/fork", json={"at": 2})).json()
    assert at_two["message_count"] == 3
    assert at_two["metadata"] == {}
    parent_log = await _tokens(api, parent)
    assert await _tokens(api, at_two["id"]) == parent_log[: at_two["token_count"]]
    turn = await _talk(api, at_two["id"], "Something else.")
    assert turn["cache"]["hit"] is True
    # The parent computed all of those tokens in its second turn: the fork's first turn
    # computes only its new message.
    assert turn["usage"]["cached_tokens"] == at_two["token_count"]
    again = (await api.post(f"/v1/threads/{at_two['id']}/fork", json={"at": 0})).json()
    system_message = (await api.get(f"/v1/threads/{parent}/messages")).json()["data"][0]
    assert (again["message_count"], again["token_count"]) == (1, system_message["token_count"])
    turn = await _talk(api, again["id"], "Hi.")
    assert turn["usage"]["cached_tokens"] > 0  # the system prompt's full blocks


async def test_rewind_drops_later_messages_keeps_the_kv_and_the_ledger(api, db_sessions):
    thread = await _thread(api)
    turns = [await _talk(api, thread, c) for c in ("One.", "Two.", "Three.")]
    log = await _tokens(api, thread)
    messages = (await api.get(f"/v1/threads/{thread}/messages")).json()["data"]
    r = await api.post(f"/v1/threads/{thread}/rewind", json={"position": 2})
    assert r.status_code == 200, r.text
    rewound = r.json()
    kept = sum(m["token_count"] for m in messages[:3])
    assert (rewound["message_count"], rewound["token_count"]) == (3, kept)
    assert await _tokens(api, thread) == log[:kept]
    assert rewound["cache"]["cached_tokens"] == kept
    # The next turn reuses all of it: a hit that computes only the new message.
    turn = await _talk(api, thread, "Two, again.")
    assert turn["cache"]["hit"] is True and turn["usage"]["cached_tokens"] == kept
    assert turn["message"]["position"] == 4
    # Billed turns stay billed.
    async with db_sessions() as session:
        query = select(func.count()).where(models.UsageRecord.thread_id == thread)
        assert (await session.execute(query)).scalar_one() == len(turns) + 1
    # Out of range and unknown fields are 400s.
    r = await api.post(f"/v1/threads/{thread}/rewind", json={"position": 9})
    assert r.status_code == 400 and "position" in r.text
    r = await api.post(f"/v1/threads/{thread}/fork", json={"at": 9})
    assert r.status_code == 400 and "at" in r.text
    r = await api.post(f"/v1/threads/{thread}/rewind", json={"pos": 1})
    assert r.status_code == 400


async def test_another_accounts_thread_is_404_for_fork_and_rewind(fake_api, new_key):
    thread = await _thread(fake_api)
    other = {"Authorization": f"Bearer {await new_key('other')}"}
    for action, body in (("fork", {}), ("rewind", {"position": 0})):
        r = await fake_api.post(f"/v1/threads/{thread}/{action}", json=body, headers=other)
        assert r.status_code == 404, r.text
    r = await fake_api.post("/v1/threads/thr_nope/fork", json={})
    assert r.status_code == 404


async def test_a_position_past_any_thread_is_a_400_not_a_database_error(fake_api):
    # Found by schemathesis: `at` past PostgreSQL's integer reached the database (500).
    thread = await _thread(fake_api)
    for action, body in (("fork", {"at": 2**64}), ("rewind", {"position": 2**31})):
        r = await fake_api.post(f"/v1/threads/{thread}/{action}", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request"


async def test_rewind_while_a_turn_runs_is_409_and_changes_nothing(open_live, new_key):
    engine = FakeEngine()
    client = await open_live(fake_runtime(engine))
    client.headers["Authorization"] = f"Bearer {await new_key()}"
    thread = await _thread(client)
    await _talk(client, thread, "first")
    engine.gate.clear()  # the next turn stays in flight
    turn = asyncio.create_task(
        client.post(f"/v1/threads/{thread}/messages", json={"content": "second"})
    )
    while thread not in engine.pinned:
        await asyncio.sleep(0.01)
    r = await client.post(f"/v1/threads/{thread}/rewind", json={"position": 0})
    assert r.status_code == 409, r.text
    assert r.json()["error"]["type"] == "thread_busy"
    # A fork meanwhile copies the committed messages only.
    fork = (await client.post(f"/v1/threads/{thread}/fork", json={})).json()
    assert fork["message_count"] == 3
    engine.gate.set()
    assert (await turn).status_code == 200
    r = await client.get(f"/v1/threads/{thread}")
    assert r.json()["message_count"] == 5


async def test_prefix_sharing_stays_within_an_account_unless_allowed(open_api, new_key):
    for across, other_shares in ((False, False), (True, True)):
        client = await open_api(**ENGINE, share_across_accounts=across)
        a = {"Authorization": f"Bearer {await new_key('a')}"}
        b = {"Authorization": f"Bearer {await new_key('b')}"}
        await _talk(client, await _thread(client, headers=a), "Hello.", headers=a)
        same = await _talk(client, await _thread(client, headers=a), "Hi.", headers=a)
        # Shared full blocks, and the tokens of a partial block copied at admission (cached,
        # not shared: the copy is the thread's own).
        assert 0 < same["cache"]["shared_tokens"] <= same["usage"]["cached_tokens"]
        assert same["usage"]["cached_tokens"] - same["cache"]["shared_tokens"] < 16
        other = await _talk(client, await _thread(client, headers=b), "Hi.", headers=b)
        assert other["cache"]["miss_reason"] == "new_thread"
        if other_shares:  # at least the system prompt's blocks (also those of "Hi." here)
            assert other["usage"]["cached_tokens"] >= other["cache"]["shared_tokens"]
            assert other["cache"]["shared_tokens"] >= same["cache"]["shared_tokens"]
            assert other["usage"]["cached_tokens"] >= same["usage"]["cached_tokens"]
        else:
            assert other["usage"]["cached_tokens"] == other["cache"]["shared_tokens"] == 0
            assert other["usage"]["fresh_tokens"] == other["usage"]["input_tokens"]


async def test_openapi_names_fork_and_rewind(fake_api):
    paths = (await fake_api.get("/schema/openapi.json")).json()["paths"]
    assert paths["/v1/threads/{thread_id}/fork"]["post"]["operationId"] == "forkThread"
    assert paths["/v1/threads/{thread_id}/rewind"]["post"]["operationId"] == "rewindThread"
