"""The KV tiers over HTTP: a restart keeps threads (disk), GET and /metrics show the tiers,
the ledger and the billing report say where cached tokens came from, DELETE removes the files."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from litestar.testing import AsyncTestClient
from sqlalchemy import select

from app.asgi import create_app
from app.db.models import UsageRecord

ENGINE = {"model": "builtin-tiny-random", "device": "cpu", "kv_cache_mb": 4}
GREEDY = {"temperature": 0, "max_tokens": 12}
PROMPTS = ["Hello there.", "Tell me more.", "And then what happened?"]


async def _talk(client, thread_id: str, content: str) -> dict:
    r = await client.post(f"/v1/threads/{thread_id}/messages", json={"content": content, **GREEDY})
    assert r.status_code == 200, r.text
    return r.json()


def _open(settings, key: str) -> AsyncTestClient:
    client = AsyncTestClient(app=create_app(replace(settings, **ENGINE)))
    client.headers["Authorization"] = f"Bearer {key}"
    return client


async def test_a_restart_keeps_threads_on_disk_and_the_reply_is_unchanged(
    settings, new_key, db_sessions
):
    key = await new_key()
    folder = settings.disk_cache_dir
    async with _open(settings, key) as api:
        restarted = (await api.post("/v1/threads", json={"system": "Be brief."})).json()["id"]
        steady = (await api.post("/v1/threads", json={"system": "Be brief."})).json()["id"]
        for content in PROMPTS[:2]:
            a = await _talk(api, restarted, content)
            b = await _talk(api, steady, content)
            assert a["message"]["content"] == b["message"]["content"]
        second_turn = a["usage"]
        never_restarted = await _talk(api, steady, PROMPTS[2])
    # The app stopped (its lifespan shut the engine down): resident threads went to disk.
    assert list((folder / "threads").iterdir())

    async with _open(settings, key) as api:
        detail = (await api.get(f"/v1/threads/{restarted}")).json()
        assert detail["cache"]["tier"] == "disk" and detail["cache"]["resident"] is False
        whole_history = second_turn["input_tokens"] + second_turn["output_tokens"] - 1
        assert detail["cache"]["cached_tokens"] == whole_history
        third = await _talk(api, restarted, PROMPTS[2])
        assert third["cache"]["tier"] == "disk" and third["cache"]["hit"] is True
        assert third["cache"]["miss_reason"] is None
        assert third["usage"]["cached_tokens"] == whole_history
        assert third["message"]["content"] == never_restarted["message"]["content"]
        detail = (await api.get(f"/v1/threads/{restarted}")).json()
        assert detail["cache"]["tier"] == "device" and detail["cache"]["resident"] is True

        metrics = (await api.get("/metrics")).text
        assert 'kvthreads_kv_tier_hits_total{tier="disk"} 1' in metrics
        assert 'kvthreads_kv_restores_total{tier="disk"} 1' in metrics
        assert 'kvthreads_kv_tier_threads{tier="disk"} 1' in metrics  # `steady` is still there
        assert 'kvthreads_kv_tier_bytes{tier="host"} 0' in metrics

        report = (await api.get("/v1/billing/report?group_by=thread")).json()
        row = next(r for r in report["rows"] if r["key"] == restarted)
        assert row["cached_disk_tokens"] == whole_history
        assert row["cached_device_tokens"] == row["cached_tokens"] - whole_history
        async with db_sessions() as session:
            tiers = (
                await session.scalars(
                    select(UsageRecord.cache_tier)
                    .where(UsageRecord.thread_id == restarted)
                    .order_by(UsageRecord.created_at)
                )
            ).all()
        assert tiers == [None, "device", "disk"]

        # Deleting a thread deletes its KV in every tier: `steady` is on disk only.
        assert (await api.delete(f"/v1/threads/{steady}")).status_code == 200
        snapshot = folder / "threads" / (steady.encode().hex() + ".snap")
        for _ in range(100):  # the disk writer removes it, in order after earlier writes
            if not snapshot.exists():
                break
            await asyncio.sleep(0.02)
        assert not snapshot.exists()
        detail = (await api.get(f"/v1/threads/{restarted}")).json()
        assert detail["cache"]["tier"] == "device"
