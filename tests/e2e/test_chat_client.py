"""`python -m app chat` against a live server: a thread, streamed replies, usage per turn."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest

from app.chat_client import ChatError, ChatOptions, run_chat
from tests.e2e.fake_engine import FakeEngine, fake_runtime


def _chat(base_url: str, key: str, lines: list[str], options: ChatOptions) -> tuple[int, str]:
    feed = iter(lines)

    def read_line(prompt: str) -> str:
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        code = run_chat(client, options, read_line, out)
    return code, out.getvalue()


async def test_chat_streams_replies_and_shows_cached_and_fresh_counts(open_live, new_key):
    engine = FakeEngine()
    client = await open_live(fake_runtime(engine))
    key = await new_key()
    base_url = str(client.base_url)
    code, text = await asyncio.to_thread(
        _chat, base_url, key, ["hello", "", "again", "/new", "third", "/quit"], ChatOptions()
    )
    assert code == 0
    threads = [line.split()[2] for line in text.splitlines() if line.startswith("new thread")]
    assert len(threads) == 2
    assert text.count("assistant> reply to ") == 3
    usage = [line for line in text.splitlines() if line.startswith("[")]
    assert usage[0].endswith("cache miss: new_thread]")
    assert usage[1].endswith("cache hit]")
    assert usage[2].endswith("cache miss: new_thread]")

    code, text = await asyncio.to_thread(
        _chat, base_url, key, ["more"], ChatOptions(thread_id=threads[0])
    )
    assert code == 0
    assert f"continuing thread {threads[0]} (5 messages" in text
    assert "cache hit]" in text

    with pytest.raises(ChatError, match="401 unauthorized"):
        await asyncio.to_thread(_chat, base_url, "kvt_wrong", ["hi"], ChatOptions())


async def test_chat_forks_and_rewinds_the_thread(open_live, new_key):
    engine = FakeEngine()
    client = await open_live(fake_runtime(engine))
    client.headers["Authorization"] = f"Bearer {(key := await new_key())}"
    lines = ["hello", "/fork", "on the fork", "/rewind 2", "/rewind x", "/rewind 99", "again"]
    code, text = await asyncio.to_thread(_chat, str(client.base_url), key, lines, ChatOptions())
    assert code == 0
    (parent,) = [line.split()[2] for line in text.splitlines() if line.startswith("new thread")]
    (forked,) = [line for line in text.splitlines() if line.startswith("forked")]
    assert forked.startswith(f"forked {parent} into thr_") and "(3 messages;" in forked
    child = forked.split()[3]
    assert "rewound to position 2 (3 messages" in text
    assert "usage: /rewind N" in text and "error: 400 invalid_request: position" in text
    # The fork took the later turns; the parent kept its first one only.
    counts = [
        (await client.get(f"/v1/threads/{t}")).json()["message_count"] for t in (parent, child)
    ]
    assert counts == [3, 5]
