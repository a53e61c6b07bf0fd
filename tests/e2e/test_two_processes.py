"""Two server processes (two apps, two engines) on one database, taking turns of one thread.

Each process keeps the KV of the turns it ran; a turn committed by the other one leaves it behind.
A hit means the whole committed history was reused, so a process that lagged must say `stale`
rather than report a hit while it recomputes the other process's turn.
"""

from __future__ import annotations

ENGINE = {"model": "builtin-tiny-random", "device": "cpu", "kv_cache_mb": 4}
GREEDY = {"temperature": 0, "max_tokens": 8}


async def _talk(client, thread_id: str, content: str) -> dict:
    r = await client.post(f"/v1/threads/{thread_id}/messages", json={"content": content, **GREEDY})
    assert r.status_code == 200, r.text
    return r.json()


async def test_a_process_that_lagged_reports_stale_not_a_hit(open_api, new_key):
    key = f"Bearer {await new_key()}"
    a, b = await open_api(**ENGINE), await open_api(**ENGINE)
    a.headers["Authorization"] = b.headers["Authorization"] = key
    thread_id = (await a.post("/v1/threads", json={"system": "Be brief."})).json()["id"]

    order = [a, a, b, a, a, b]
    turns = [await _talk(client, thread_id, f"Message {k}.") for k, client in enumerate(order)]
    cache = [t["cache"] for t in turns]
    usage = [t["usage"] for t in turns]

    assert cache[0]["miss_reason"] == "new_thread"
    assert cache[2]["miss_reason"] == "restarted"  # b never held the thread
    for k in (3, 5):  # a (then b) holds an older prefix of the log: the rest is recomputed
        assert cache[k]["hit"] is False
        assert cache[k]["miss_reason"] == "stale"
        assert usage[k]["cached_tokens"] < usage[k - 1]["input_tokens"]
    for k in (1, 4):  # the process ran the previous turn itself: the whole history is reused
        assert cache[k]["hit"] is True and cache[k]["miss_reason"] is None
        previous = usage[k - 1]
        assert usage[k]["cached_tokens"] >= previous["input_tokens"] + previous["output_tokens"] - 1
    for u in usage:
        assert u["input_tokens"] == u["cached_tokens"] + u["fresh_tokens"]
