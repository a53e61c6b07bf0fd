"""Threads over HTTP: keys and accounts, create/list/read/delete, messages and the token log."""

from __future__ import annotations

from sqlalchemy import func, select

from app.db import models
from app.db.accounts import revoke_key
from tests.e2e.fake_engine import fake_runtime
from tests.e2e.snapshot import snapshot


async def test_every_v1_call_needs_a_valid_key(open_api, fake_engine, new_key, db_sessions):
    client = await open_api(fake_runtime(fake_engine))
    key = await new_key()
    r = await client.post("/v1/threads", json={}, headers={"Authorization": f"Bearer {key}"})
    thread_id = r.json()["id"]
    before = await snapshot(db_sessions)
    calls = [
        ("POST", "/v1/threads", {}),
        ("GET", "/v1/threads", None),
        ("GET", f"/v1/threads/{thread_id}", None),
        ("DELETE", f"/v1/threads/{thread_id}", None),
        ("POST", f"/v1/threads/{thread_id}/messages", {"content": "hi"}),
        ("GET", f"/v1/threads/{thread_id}/messages", None),
        ("GET", f"/v1/threads/{thread_id}/tokens", None),
    ]
    bad_headers = [
        {},
        {"Authorization": key},  # no scheme
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer "},
        {"Authorization": "Bearer kvt_not-a-real-key"},
        {"Authorization": f"Bearer {key}x"},
    ]
    for method, url, body in calls:
        for headers in bad_headers:
            r = await client.request(method, url, json=body, headers=headers)
            assert r.status_code == 401, (method, url, headers, r.text)
            assert r.json()["error"]["type"] == "unauthorized"
            assert r.headers["www-authenticate"].startswith("Bearer")
    assert await snapshot(db_sessions) == before

    async with db_sessions.begin() as session:
        await revoke_key(session, key)
    r = await client.get("/v1/threads", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401
    assert "revoked" in r.json()["error"]["message"]


async def test_another_account_gets_404_never_the_content(
    open_api, fake_engine, new_key, db_sessions
):
    client = await open_api(fake_runtime(fake_engine))
    owner = {"Authorization": f"Bearer {await new_key('owner')}"}
    stranger = {"Authorization": f"Bearer {await new_key('stranger')}"}
    r = await client.post("/v1/threads", json={"system": "secret plans"}, headers=owner)
    thread_id = r.json()["id"]
    await client.post(f"/v1/threads/{thread_id}/messages", json={"content": "hi"}, headers=owner)
    before = await snapshot(db_sessions)
    for method, url, body in [
        ("GET", f"/v1/threads/{thread_id}", None),
        ("DELETE", f"/v1/threads/{thread_id}", None),
        ("POST", f"/v1/threads/{thread_id}/messages", {"content": "hi"}),
        ("GET", f"/v1/threads/{thread_id}/messages", None),
        ("GET", f"/v1/threads/{thread_id}/tokens", None),
    ]:
        r = await client.request(method, url, json=body, headers=stranger)
        assert r.status_code == 404, (method, url, r.text)
        assert r.json()["error"]["type"] == "not_found"
        assert "secret" not in r.text
    assert (await client.get("/v1/threads", headers=stranger)).json()["data"] == []
    assert await snapshot(db_sessions) == before
    r = await client.get("/v1/threads/thr_nope", headers=owner)
    assert r.status_code == 404


async def test_thread_lifecycle_and_token_log(fake_api, fake_engine, db_sessions):
    r = await fake_api.post("/v1/threads", json={"system": "be brief", "metadata": {"user": "u1"}})
    assert r.status_code == 201, r.text
    thread = r.json()
    start_ids = fake_engine.chat_format.start("be brief")
    assert thread["object"] == "thread" and thread["id"].startswith("thr_")
    assert thread["model"] == "fake-engine" and thread["system"] == "be brief"
    assert thread["metadata"] == {"user": "u1"}
    assert (thread["token_count"], thread["message_count"]) == (len(start_ids), 1)
    thread_id = thread["id"]

    r = await fake_api.get(f"/v1/threads/{thread_id}")
    assert r.json()["cache"] == {
        "resident": False, "cached_tokens": 0, "shared_tokens": 0, "tier": None
    }  # fmt: skip

    r = await fake_api.post(f"/v1/threads/{thread_id}/messages", json={"content": "hello"})
    turn = r.json()
    assert turn["message"]["role"] == "assistant" and turn["message"]["position"] == 2

    r = await fake_api.get(f"/v1/threads/{thread_id}")
    detail = r.json()
    assert detail["message_count"] == 3
    assert detail["cache"]["resident"] is True
    assert detail["cache"]["cached_tokens"] == fake_engine.thread_state(thread_id).cached_tokens > 0

    messages = (await fake_api.get(f"/v1/threads/{thread_id}/messages")).json()["data"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert [m["content"] for m in messages] == ["be brief", "hello", turn["message"]["content"]]
    log = (await fake_api.get(f"/v1/threads/{thread_id}/tokens")).json()["token_ids"]
    user_ids = fake_engine.chat_format.user_turn("hello")
    assert log[: len(start_ids) + len(user_ids)] == start_ids + user_ids
    assert len(log) == detail["token_count"] == sum(m["token_count"] for m in messages)

    r = await fake_api.delete(f"/v1/threads/{thread_id}")
    assert r.status_code == 200
    assert r.json() == {"id": thread_id, "object": "thread.deleted", "deleted": True}
    assert fake_engine.thread_state(thread_id).resident is False
    assert (await fake_api.get(f"/v1/threads/{thread_id}")).status_code == 404
    assert (await fake_api.delete(f"/v1/threads/{thread_id}")).status_code == 404
    async with db_sessions() as session:
        # The messages went with the thread; the bill stays, detached from it.
        assert await session.scalar(select(func.count()).select_from(models.Message)) == 0
        ledger = (await session.execute(select(models.UsageRecord))).scalars().all()
        assert len(ledger) == 1 and ledger[0].thread_id is None


async def test_pages_of_threads_newest_first_and_messages_oldest_first(fake_api):
    ids = [(await fake_api.post("/v1/threads", json={})).json()["id"] for _ in range(5)]
    seen, after = [], None
    while True:
        params = {"limit": 2} | ({"after": after} if after else {})
        page = (await fake_api.get("/v1/threads", params=params)).json()
        seen += [t["id"] for t in page["data"]]
        if not page["has_more"]:
            assert page["next_cursor"] is None
            break
        after = page["next_cursor"]
    assert seen == ids[::-1]

    thread_id = ids[0]
    for text in ("one", "two"):
        await fake_api.post(f"/v1/threads/{thread_id}/messages", json={"content": text})
    positions, after = [], None
    while True:
        params = {"limit": 2} | ({"after": after} if after else {})
        page = (await fake_api.get(f"/v1/threads/{thread_id}/messages", params=params)).json()
        positions += [m["position"] for m in page["data"]]
        if not page["has_more"]:
            break
        after = page["next_cursor"]
    assert positions == [0, 1, 2, 3, 4]

    for params in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"after": "garbage"}):
        r = await fake_api.get("/v1/threads", params=params)
        assert r.status_code == 400, (params, r.text)
        assert next(iter(params)) in r.json()["error"]["message"]
