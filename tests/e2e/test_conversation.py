"""Conversations on the real engine (the built-in tiny model, CPU, a small KV pool) over HTTP."""

from __future__ import annotations

import asyncio

import pytest

from tests.e2e.snapshot import snapshot
from tests.e2e.sse import parse_sse

ENGINE = {"model": "builtin-tiny-random", "device": "cpu", "kv_cache_mb": 4}
GREEDY = {"temperature": 0, "max_tokens": 12}
PROMPTS = ["Hello there.", "Tell me more.", "Why?", "And then what happened?", "Thanks!"]


@pytest.fixture
async def api(open_api, new_key):
    client = await open_api(**ENGINE)
    client.headers["Authorization"] = f"Bearer {await new_key()}"
    return client


async def _talk(client, thread_id: str, content: str, headers=None, **extra) -> dict:
    r = await client.post(
        f"/v1/threads/{thread_id}/messages", json={"content": content, **extra}, headers=headers
    )
    assert r.status_code == 200, r.text
    return r.json()


async def test_five_turns_compute_only_the_new_tokens(api):
    thread = (await api.post("/v1/threads", json={"system": "You are terse."})).json()
    thread_id, turns = thread["id"], []
    log_lengths = [thread["token_count"]]
    for content in PROMPTS:
        turns.append(await _talk(api, thread_id, content, **GREEDY))
        log_lengths.append((await api.get(f"/v1/threads/{thread_id}")).json()["token_count"])

    log = (await api.get(f"/v1/threads/{thread_id}/tokens")).json()["token_ids"]
    assert len(log) == log_lengths[-1]
    for k, turn in enumerate(turns):
        usage = turn["usage"]
        assert usage["input_tokens"] == usage["cached_tokens"] + usage["fresh_tokens"]
        message_tokens = len(api_user_turn(content=PROMPTS[k]))
        # The model conditioned on the whole log before the reply: history + the new message.
        assert usage["input_tokens"] == log_lengths[k] + message_tokens
        if k == 0:
            assert turn["cache"] == {
                "hit": False, "tier": None, "miss_reason": "new_thread", "shared_tokens": 0
            }  # fmt: skip
            assert usage["cached_tokens"] == 0
            continue
        previous = turns[k - 1]["usage"]
        assert turn["cache"] == {
            "hit": True, "tier": "device", "miss_reason": None, "shared_tokens": 0
        }  # fmt: skip
        assert usage["cached_tokens"] >= previous["input_tokens"] + previous["output_tokens"] - 1
        # Fresh = exactly the tokens new since the previous turn's KV: what the log gained
        # after the cached prefix (the last sampled token, the closing tokens, the message).
        assert usage["fresh_tokens"] == usage["input_tokens"] - usage["cached_tokens"]
        new_since_previous = usage["input_tokens"] - (
            previous["input_tokens"] + previous["output_tokens"] - 1
        )
        assert usage["fresh_tokens"] == new_since_previous
    detail = (await api.get(f"/v1/threads/{thread_id}")).json()
    last = turns[-1]["usage"]
    assert detail["cache"] == {
        "resident": True,
        "cached_tokens": last["input_tokens"] + last["output_tokens"] - 1,
        "shared_tokens": 0,
        "tier": "device",
    }


def api_user_turn(content: str) -> list[int]:
    from app.chat.chat_format import SimpleChatFormat
    from app.engine.loading.builtin import builtin_tokenizer

    return SimpleChatFormat(builtin_tokenizer()).user_turn(content)


async def test_restart_recomputes_once_and_replies_as_if_it_never_restarted(
    open_api, new_key, db_sessions
):
    key = await new_key()
    auth = {"Authorization": f"Bearer {key}"}
    steady = await open_api(**ENGINE)
    steady.headers.update(auth)
    first = await open_api(**ENGINE)
    first.headers.update(auth)

    ids = []
    for client in (steady, first):
        thread_id = (await client.post("/v1/threads", json={"system": "s"})).json()["id"]
        ids.append(thread_id)
        for content in PROMPTS[:2]:
            await _talk(client, thread_id, content, **GREEDY)
    steady_id, restarted_id = ids

    # "Restart": a new app instance (new engine, empty cache) on the same database, while the
    # first still runs: no shutdown wrote a snapshot (crash-like), so the history recomputes.
    restarted = await open_api(**ENGINE)
    restarted.headers.update(auth)
    after_restart = await _talk(restarted, restarted_id, PROMPTS[2], **GREEDY)
    never_restarted = await _talk(steady, steady_id, PROMPTS[2], **GREEDY)

    assert after_restart["cache"] == {
        "hit": False,
        "tier": None,
        "miss_reason": "restarted",
        "shared_tokens": 0,
    }
    assert after_restart["usage"]["cached_tokens"] == 0
    assert after_restart["usage"]["fresh_tokens"] == after_restart["usage"]["input_tokens"]
    assert never_restarted["cache"]["hit"] is True
    assert after_restart["message"]["content"] == never_restarted["message"]["content"]
    assert after_restart["usage"]["input_tokens"] == never_restarted["usage"]["input_tokens"]
    # Once: the turn after that is a hit again.
    again = await _talk(restarted, restarted_id, PROMPTS[3], **GREEDY)
    assert again["cache"]["hit"] is True
    assert again["usage"]["cached_tokens"] >= (
        after_restart["usage"]["input_tokens"] + after_restart["usage"]["output_tokens"] - 1
    )
    logs = [
        (await client.get(f"/v1/threads/{tid}/tokens")).json()["token_ids"]
        for client, tid in ((steady, steady_id), (restarted, restarted_id))
    ]
    assert logs[1][: len(logs[0])] == logs[0]


async def test_streaming_and_plain_give_the_same_text_and_usage(api, new_key):
    sampled = {"temperature": 0.9, "top_p": 0.95, "top_k": 50, "seed": 7, "max_tokens": 24}
    results = []
    for stream in (False, True):
        # One account each: the second thread would share the first one's KV blocks otherwise.
        auth = {"Authorization": f"Bearer {await new_key(f'stream-{stream}')}"}
        r = await api.post("/v1/threads", json={"system": "s"}, headers=auth)
        thread_id = r.json()["id"]
        await _talk(api, thread_id, "Warm up.", headers=auth, **sampled)
        body = {"content": "Go on.", **sampled, "stream": stream}
        r = await api.post(f"/v1/threads/{thread_id}/messages", json=body, headers=auth)
        assert r.status_code == 200, r.text
        if not stream:
            results.append(r.json())
            continue
        assert r.headers["content-type"].startswith("text/event-stream")
        events = parse_sse(r.text)
        kinds = [kind for kind, _ in events]
        assert kinds[-1] == "done" and set(kinds[:-1]) == {"delta"}
        done = events[-1][1]
        assert "".join(data["text"] for _, data in events[:-1]) == done["message"]["content"]
        results.append(done)
    plain, streamed = results
    assert streamed["message"]["content"] == plain["message"]["content"]
    assert streamed["message"]["finish_reason"] == plain["message"]["finish_reason"]
    assert streamed["usage"] == plain["usage"]
    assert streamed["cache"] == plain["cache"]


async def test_stop_strings_cut_the_reply_the_same_way_streamed_or_not(api):
    base = {"temperature": 0, "max_tokens": 24}
    thread_id = (await api.post("/v1/threads", json={})).json()["id"]
    probe = await _talk(api, thread_id, "Say something.", **base)
    text = probe["message"]["content"]
    if len(text) < 4:
        pytest.skip("the tiny model's reply is too short to cut")
    stop = text[2:4]  # a stop string the greedy reply is known to contain
    replies = []
    for stream in (False, True):
        tid = (await api.post("/v1/threads", json={})).json()["id"]
        body = {"content": "Say something.", **base, "stop": [stop], "stream": stream}
        r = await api.post(f"/v1/threads/{tid}/messages", json=body)
        if stream:
            events = parse_sse(r.text)
            assert (
                "".join(d["text"] for e, d in events if e == "delta")
                == events[-1][1]["message"]["content"]
            )
            replies.append(events[-1][1]["message"])
        else:
            replies.append(r.json()["message"])
    assert replies[0]["content"] == replies[1]["content"] == text[: text.index(stop)]
    assert replies[0]["finish_reason"] == replies[1]["finish_reason"] == "stop"


async def test_concurrent_appends_on_a_live_server(open_live, new_key, db_sessions):
    client = await open_live(**ENGINE)
    client.headers["Authorization"] = f"Bearer {await new_key()}"
    one = (await client.post("/v1/threads", json={})).json()["id"]
    two = (await client.post("/v1/threads", json={})).json()["id"]
    long_turn = {"content": "Hi", "temperature": 0, "max_tokens": 200}

    # The first turn is streaming (its first delta is out: it is in flight) when the second comes.
    url = f"/v1/threads/{one}/messages"
    async with client.stream("POST", url, json={**long_turn, "stream": True}) as first:
        lines = first.aiter_lines()
        assert await anext(lines) == "event: delta"
        second = await client.post(url, json=long_turn)
        rest = [line async for line in lines]
    assert "event: done" in rest
    assert second.status_code == 409, second.text
    assert second.json()["error"]["type"] == "thread_busy"

    both = await asyncio.gather(
        client.post(f"/v1/threads/{one}/messages", json=long_turn),
        client.post(f"/v1/threads/{two}/messages", json=long_turn),
    )
    assert [r.status_code for r in both] == [200, 200], [r.text for r in both]
    counts = [(await client.get(f"/v1/threads/{t}")).json()["message_count"] for t in (one, two)]
    assert counts == [5, 3]


async def test_cancelled_stream_on_the_real_engine_rolls_back(open_live, new_key, db_sessions):
    client = await open_live(**ENGINE)
    client.headers["Authorization"] = f"Bearer {await new_key()}"
    thread_id = (await client.post("/v1/threads", json={})).json()["id"]
    url = f"/v1/threads/{thread_id}/messages"
    first = (await client.post(url, json={"content": "Hi", **GREEDY})).json()
    committed = (await client.get(f"/v1/threads/{thread_id}")).json()["token_count"]
    before = await snapshot(db_sessions)

    body = {"content": "Go on", "temperature": 0, "max_tokens": 2000, "stream": True}
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        lines = r.aiter_lines()
        assert await anext(lines) == "event: delta"  # prefill done, decoding

    # Rolled back to the committed log: the KV of the whole history (computed during the
    # aborted turn, so more than before it) and nothing of the aborted message or reply.
    for _ in range(200):
        detail = (await client.get(f"/v1/threads/{thread_id}")).json()
        if detail["cache"]["cached_tokens"] == committed:
            break
        await asyncio.sleep(0.05)
    assert detail["cache"] == {
        "resident": True, "cached_tokens": committed, "shared_tokens": 0, "tier": "device"
    }  # fmt: skip
    assert detail["message_count"] == 3
    assert await snapshot(db_sessions) == before
    # The lock was released and the cache is consistent: the next turn is a hit.
    nxt = (await client.post(url, json={"content": "Again", **GREEDY})).json()
    assert nxt["cache"]["hit"] is True
    assert nxt["usage"]["cached_tokens"] >= (
        first["usage"]["input_tokens"] + first["usage"]["output_tokens"] - 1
    )
