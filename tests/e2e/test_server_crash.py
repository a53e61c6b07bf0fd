"""kill -9 of the server in the middle of a streamed turn: the database holds whole turns only,
and the restarted server goes on with the thread (a real `python -m app serve` process, the
built-in tiny model)."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx

from tests.e2e.turn_log_check import assert_no_half_turns
from tests.integration._processes import clean_env, interrupt, start, wait_healthy
from tests.ports import free_port


async def test_kill_9_mid_stream_leaves_no_half_turn_and_the_next_turn_works(
    db_url, db_sessions, new_key, tmp_path: Path
):
    port = free_port()
    env = clean_env(DATABASE_URL=db_url, KVTHREADS_PORT=str(port))
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {await new_key()}"}
    log = tmp_path / "serve.log"
    server = start("app", "serve", env=env, log=log)
    try:
        wait_healthy(server, f"{base}/healthz", log)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
            thread_id = (await client.post("/v1/threads", json={})).json()["id"]
            url = f"/v1/threads/{thread_id}/messages"
            r = await client.post(url, json={"content": "first", "max_tokens": 4})
            assert r.status_code == 200, r.text
            acked = [r.json()["message"]["id"]]

            body = {"content": "a long one", "max_tokens": 200, "stream": True}
            events = []
            try:
                async with client.stream("POST", url, json=body) as streamed:
                    async for line in streamed.aiter_lines():
                        if line.startswith("event: "):
                            events.append(line.removeprefix("event: "))
                        if events == ["delta"]:
                            server.send_signal(signal.SIGKILL)  # mid-generation
                            server.wait(timeout=10)
            except httpx.TransportError:
                pass  # the connection died with the server
            assert "done" not in events, events
            assert server.returncode == -signal.SIGKILL
        assert await assert_no_half_turns(db_sessions) >= set(acked)

        log = tmp_path / "serve-again.log"
        server = start("app", "serve", env=env, log=log)
        wait_healthy(server, f"{base}/healthz", log)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
            for stream in (False, True):
                r = await client.post(
                    url, json={"content": "again", "max_tokens": 4, "stream": stream}
                )
                assert r.status_code == 200, r.text
                assert ("event: done" in r.text) if stream else r.json()["message"]["id"]
            messages = (await client.get(url)).json()["data"]
        roles = [m["role"] for m in messages]
        assert roles == ["system"] + ["user", "assistant"] * 3, roles  # the killed turn is gone
        assert await assert_no_half_turns(db_sessions) >= set(acked)
    finally:
        interrupt(server)
