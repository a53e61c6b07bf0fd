"""The multi-turn benchmark driving the real service: two `python -m app serve` instances
(residency on and off) on a fresh database, a few turns of `chat` through HTTP and SSE."""

from __future__ import annotations

import asyncio
import json

from bench.multiturn.records import RunResult
from bench.multiturn.report import summarize


async def test_benchmark_drives_both_modes_of_the_real_service(empty_db_url, tmp_path, capsys):
    from bench.multiturn.__main__ import main

    args = ["--profiles", "chat", "--model", "builtin-tiny-random", "--scale", "0.17",
            "--reply-scale", "0.05", "--concurrency", "2", "--no-warmup",
            "--database-url", empty_db_url, "--out", str(tmp_path)]  # fmt: skip
    code = await asyncio.to_thread(main, args)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "PASS  chat: cache-mode fresh tokens == new tokens" in printed

    data = json.loads(next(tmp_path.glob("multiturn-*.json")).read_text())
    runs = {r["mode"]: RunResult.from_json(r) for r in data["runs"]}
    cache, recompute = runs["cache"], runs["recompute"]
    assert len(cache.turns) == len(recompute.turns) >= 4
    assert all(r.ok and r.ttft_s is not None for r in cache.turns + recompute.turns)
    assert all(r.cache_hit for r in cache.turns if r.turn > 1)
    assert all(r.miss_reason == "disabled" and r.cached_tokens == 0 for r in recompute.turns)
    assert summarize(cache).fresh_check.ok and summarize(recompute).fresh_check.ok
    assert cache.settings["KVTHREADS_RESIDENCY"] == "on"
    assert recompute.settings["KVTHREADS_RESIDENCY"] == "off"
    assert next(tmp_path.glob("multiturn-*.png")).stat().st_size > 0
