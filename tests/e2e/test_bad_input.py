"""Every bad input gets its status and a message naming the problem, and writes nothing."""

from __future__ import annotations

import pytest

from tests.e2e.fake_engine import fake_runtime
from tests.e2e.snapshot import snapshot

LONG = "x" * 40_000  # over the default 32 KiB message limit
ACCENTED = "é" * 20_000  # 20,000 characters, 40,000 bytes of UTF-8

APPEND_CASES = [
    # body, status, error type, words the message must contain
    ({"content": "hi", "max_token": 5}, 400, "invalid_request", ["max_token"]),
    ({"content": 5}, 400, "invalid_request", ["content"]),
    ({"content": ""}, 400, "invalid_request", ["content"]),
    ({}, 400, "invalid_request", ["content"]),
    ({"content": None}, 400, "invalid_request", ["content"]),
    ({"content": "hi", "temperature": 2.5}, 400, "invalid_request", ["temperature"]),
    ({"content": "hi", "temperature": -0.1}, 400, "invalid_request", ["temperature"]),
    ({"content": "hi", "temperature": "hot"}, 400, "invalid_request", ["temperature"]),
    ({"content": "hi", "top_p": 0}, 400, "invalid_request", ["top_p"]),
    ({"content": "hi", "top_p": 1.5}, 400, "invalid_request", ["top_p"]),
    ({"content": "hi", "top_k": -1}, 400, "invalid_request", ["top_k"]),
    ({"content": "hi", "top_k": 1.5}, 400, "invalid_request", ["top_k"]),
    ({"content": "hi", "max_tokens": 0}, 400, "invalid_request", ["max_tokens"]),
    ({"content": "hi", "max_tokens": "many"}, 400, "invalid_request", ["max_tokens"]),
    ({"content": "hi", "max_tokens": 10**6}, 400, "invalid_request", ["max_tokens", "context"]),
    ({"content": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_request", ["stop"]),
    ({"content": "hi", "stop": [""]}, 400, "invalid_request", ["stop"]),
    ({"content": "hi", "stop": "END"}, 400, "invalid_request", ["stop"]),
    ({"content": "hi", "seed": -1}, 400, "invalid_request", ["seed"]),
    ({"content": "hi", "stream": "yes"}, 400, "invalid_request", ["stream"]),
    ({"content": "a\u0000b"}, 400, "invalid_request", ["content", "NUL"]),
    ({"content": "hi", "stop": ["x", "\u0000"]}, 400, "invalid_request", ["stop[1]", "NUL"]),
    ({"content": LONG}, 413, "message_too_large", ["40000", "32768"]),
    ({"content": ACCENTED}, 413, "message_too_large", ["40000", "32768"]),
]

CREATE_CASES = [
    ({"system": 5}, ["system"]),
    ({"metadata": {"a": 1}}, ["metadata"]),
    ({"metadata": ["a"]}, ["metadata"]),
    ({"metadata": {str(i): "v" for i in range(17)}}, ["metadata"]),
    ({"metadata": {"": "v"}}, ["metadata"]),
    ({"metadata": {"k" * 65: "v"}}, ["metadata"]),
    ({"metadata": {"k": "v" * 513}}, ["metadata"]),
    ({"model": "other"}, ["model"]),
    ({"system": "a\u0000"}, ["system", "NUL"]),
    ({"metadata": {"k": "\u0000"}}, ["metadata", "NUL"]),
    ({"metadata": {"\u0000": "v"}}, ["metadata", "NUL"]),
]


@pytest.fixture
async def thread_id(fake_api) -> str:
    r = await fake_api.post("/v1/threads", json={"system": "s"})
    assert r.status_code == 201, r.text
    # One completed turn, so that a rejected request has history it could disturb.
    r = await fake_api.post(f"/v1/threads/{r.json()['id']}/messages", json={"content": "hi"})
    assert r.status_code == 200, r.text
    return r.json()["thread_id"]


async def test_bad_appends_are_rejected_and_write_nothing(fake_api, db_sessions, thread_id):
    url = f"/v1/threads/{thread_id}/messages"
    before = await snapshot(db_sessions)
    for body, status, error_type, words in APPEND_CASES:
        for stream in (False, True):
            sent = {**body, "stream": stream} if "stream" not in body else body
            r = await fake_api.post(url, json=sent)
            assert r.status_code == status, (sent, r.text)
            error = r.json()["error"]
            assert error["type"] == error_type, (sent, error)
            assert all(word in error["message"] for word in words), (sent, error)
    assert await snapshot(db_sessions) == before


async def test_bad_bodies_headers_and_creates_write_nothing(fake_api, db_sessions, thread_id):
    url = f"/v1/threads/{thread_id}/messages"
    before = await snapshot(db_sessions)
    for body, words in CREATE_CASES:
        r = await fake_api.post("/v1/threads", json=body)
        assert r.status_code == 400, (body, r.text)
        assert all(word in r.json()["error"]["message"] for word in words), (body, r.text)

    json_headers = {"Content-Type": "application/json"}
    for raw in (b"{not json", b"[]", b'"hi"', b""):
        r = await fake_api.post(url, content=raw, headers=json_headers)
        assert r.status_code == 400, (raw, r.text)
        assert r.json()["error"]["type"] == "invalid_request"

    # Past the request body limit: refused before it is read whole.
    r = await fake_api.post(url, json={"content": "x" * 300_000})
    assert r.status_code == 413, r.text

    for key in ("", "k" * 256, "naïve".encode(), "tab\there"):
        r = await fake_api.post(url, json={"content": "hi"}, headers={"Idempotency-Key": key})
        assert r.status_code == 400, (key, r.text)
        assert "Idempotency-Key" in r.json()["error"]["message"]
    assert await snapshot(db_sessions) == before


async def test_context_overflow_names_every_count_and_writes_nothing(
    open_api, fake_engine, new_key, db_sessions
):
    client = await open_api(fake_runtime(fake_engine, max_context_tokens=80))
    client.headers["Authorization"] = f"Bearer {await new_key()}"
    thread_id = (await client.post("/v1/threads", json={"system": "s"})).json()["id"]
    url = f"/v1/threads/{thread_id}/messages"
    r = await client.post(url, json={"content": "hi", "max_tokens": 40})
    assert r.status_code == 200, r.text
    thread_tokens = (await client.get(f"/v1/threads/{thread_id}")).json()["token_count"]
    before = await snapshot(db_sessions)

    content = "y" * 30
    message_tokens = len(fake_engine.chat_format.user_turn(content))
    max_tokens = 80 - thread_tokens - message_tokens + 1  # one token too many
    r = await client.post(url, json={"content": content, "max_tokens": max_tokens})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "context_length_exceeded"
    for number in (thread_tokens, message_tokens, max_tokens, 80):
        assert str(number) in error["message"], error["message"]

    # Without max_tokens the reply may use what room is left; with no room at all, 400 too.
    r = await client.post(url, json={"content": "z" * 60})
    assert r.status_code == 400 and r.json()["error"]["type"] == "context_length_exceeded"
    assert await snapshot(db_sessions) == before

    r = await client.post(url, json={"content": "ok"})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["input_tokens"] + usage["output_tokens"] <= 80


JSON = {"Content-Type": "application/json"}
RAW_CASES = [
    # raw body, headers, status, error type, words the message must contain
    (b"[" * 1000 + b"]" * 1000, JSON, 400, "invalid_request", ["nested"]),
    (b'{"content": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", JSON, 400, "invalid_request", []),
    (b'{"content":"\xff"}', JSON, 400, "invalid_request", ["UTF-8"]),
    (b'{"content":"\\ud800"}', JSON, 400, "invalid_request", ["JSON"]),
    (b'{"content":"hi","temperature":NaN}', JSON, 400, "invalid_request", ["JSON"]),
    (b'{"content":"hi","max_tokens":"16"}', JSON, 400, "invalid_request", ["max_tokens", "int"]),
    (b'{"content":"hi","stream":1}', JSON, 400, "invalid_request", ["stream", "bool"]),
    (b'{"content":"hi","content":"again"}', JSON, 400, "invalid_request", ["twice", "content"]),
    (b"", JSON, 400, "invalid_request", ["empty"]),
    (b"", {}, 400, "invalid_request", ["empty"]),
    (b'{"content":"hi"}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type",
     ["application/json", "text/plain"]),
    (b"content=hi", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type", ["application/json"]),
    (b'{"content":"hi"}', {}, 415, "unsupported_media_type", ["application/json"]),
]  # fmt: skip


async def test_bodies_must_be_strict_json_and_write_nothing(
    fake_api, fake_engine, db_sessions, thread_id
):
    url = f"/v1/threads/{thread_id}/messages"
    before = await snapshot(db_sessions)
    turns_before = fake_engine.commits + fake_engine.rollbacks
    for raw, headers, status, error_type, words in RAW_CASES:
        r = await fake_api.post(url, content=raw, headers=headers)  # raw content: no type added
        assert r.status_code == status, (raw[:40], headers, r.text)
        error = r.json()["error"]
        assert error["type"] == error_type, (raw[:40], error)
        assert all(word in error["message"] for word in words), (raw[:40], error)
        assert "(data)" not in error["message"], error
    r = await fake_api.post("/v1/threads", content=b'{"system":"s"}', headers={})
    assert r.status_code == 415, r.text
    assert await snapshot(db_sessions) == before
    assert fake_engine.commits + fake_engine.rollbacks == turns_before  # no turn ran

    r = await fake_api.post(url, content=b'{"content":"hi"}', headers={**JSON, "X": "1"})
    assert r.status_code == 200, r.text
    r = await fake_api.post(
        url,
        content=b'{"content":"hi"}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 200, r.text


async def test_bad_thread_ids_are_400_before_the_database(fake_api):
    for path in ("/v1/threads/thr_%00", "/v1/threads/thr_%00/messages", "/v1/threads/a%20b/tokens"):
        r = await fake_api.get(path)
        assert r.status_code == 400, (path, r.text)
        error = r.json()["error"]
        assert error["type"] == "invalid_request" and "thread_id" in error["message"], error
    r = await fake_api.delete("/v1/threads/thr_%00")
    assert r.status_code == 400, r.text
    r = await fake_api.post("/v1/threads/thr_%00/messages", json={"content": "hi"})
    assert r.status_code == 400, r.text
    r = await fake_api.get("/v1/threads/thr_nope")
    assert r.status_code == 404, r.text
