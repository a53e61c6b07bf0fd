"""/metrics: open without a token (engine counters and histograms, no ledger totals); with
KVTHREADS_METRICS_TOKEN set, only to that bearer token, ledger totals included."""

from __future__ import annotations

ENGINE = {"model": "builtin-tiny-random", "device": "cpu", "kv_cache_mb": 4}
TOKEN = "metrics-token-abcdef0123456789"


async def _one_turn(client, key: str) -> dict:
    headers = {"Authorization": f"Bearer {key}"}
    thread_id = (await client.post("/v1/threads", json={}, headers=headers)).json()["id"]
    r = await client.post(
        f"/v1/threads/{thread_id}/messages",
        json={"content": "Hello.", "max_tokens": 5, "temperature": 0},
        headers=headers,
    )
    assert r.status_code == 200, r.text
    return r.json()["usage"]


async def test_open_metrics_show_engine_histograms_but_no_ledger_totals(open_api, new_key):
    client = await open_api(**ENGINE)
    usage = await _one_turn(client, await new_key())
    r = await client.get("/metrics")
    assert r.status_code == 200
    text = r.text
    assert "kvthreads_ledger" not in text
    for name in ("queue_seconds", "ttft_seconds", "tpot_seconds", "turn_seconds"):
        assert f"# TYPE kvthreads_turn_{name} histogram" in text
        assert f'kvthreads_turn_{name}_bucket{{le="+Inf"}} 1\n' in text
    assert f"kvthreads_turn_input_tokens_sum {usage['input_tokens']}" in text
    assert f"kvthreads_turn_output_tokens_sum {usage['output_tokens']}" in text
    assert "kvthreads_turn_output_tokens_count 1\n" in text
    assert "kvthreads_kv_pool_blocks_total 512\n" in text
    assert "kvthreads_kv_pool_usage_ratio " in text
    assert 'kvthreads_kv_misses_total{reason="stale"} 0\n' in text


async def test_a_metrics_token_guards_the_endpoint_and_adds_the_ledger(open_api, new_key):
    client = await open_api(**ENGINE, metrics_token=TOKEN)
    await _one_turn(client, await new_key())
    assert (await client.get("/metrics")).status_code == 401
    wrong = await client.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    assert wrong.json()["error"]["type"] == "unauthorized"
    r = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert "kvthreads_ledger_turns_total{" in r.text
    assert "kvthreads_turn_ttft_seconds_count 1\n" in r.text
