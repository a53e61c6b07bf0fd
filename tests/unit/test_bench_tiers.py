"""The multi-turn benchmark's tiers comparison: which later turns reused their whole history."""

from __future__ import annotations

import json

from bench.multiturn.records import RunResult, TurnRecord
from bench.multiturn.suite import history_reuse


def record(conversation: int, turn: int, input_tokens: int, cached: int, output: int):
    return TurnRecord(
        conversation=conversation,
        turn=turn,
        user_tokens=5,
        max_tokens=10,
        input_tokens=input_tokens,
        cached_tokens=cached,
        fresh_tokens=input_tokens - cached,
        output_tokens=output,
    )


def test_history_reuse_counts_turns_that_kept_all_the_kv_of_the_turn_before():
    turns = [
        record(0, 2, 60, 29, 10),  # turn 1 had 20 input + 10 output: history 29, all cached
        record(0, 1, 20, 0, 10),
        record(0, 3, 100, 40, 10),  # history 69: 29 tokens of it recomputed
        record(1, 1, 30, 0, 5),
        record(1, 2, 50, 34, 5),
    ]
    run = RunResult("pressure", "cache", 3, 0, 1.0, turns)
    assert history_reuse(run) == {
        "turns": 3,
        "reused": 2,
        "reused_fraction": 2 / 3,
        "history_tokens_recomputed": 29,
    }


def pressure_run(mode: str, cached_later: int) -> RunResult:
    turns = [record(c, 1, 20, 0, 10) for c in (0, 1)]
    turns += [record(c, 2, 60, cached_later, 10) for c in (0, 1)]
    for r in turns:
        r.ttft_s, r.cache_hit = 0.1 * r.turn, r.cached_tokens > 0
        r.miss_reason = None if r.cache_hit else "new_thread" if r.turn == 1 else "disabled"
    return RunResult("pressure", mode, 3, 0, 1.0, turns)


def test_the_tiers_off_run_is_saved_reprinted_and_plotted(tmp_path, capsys):
    from bench.multiturn.__main__ import main
    from bench.multiturn.suite import load_result

    on, recompute, off = (
        pressure_run("cache", 29),
        pressure_run("recompute", 0),
        pressure_run("cache", 0),
    )
    meta = {"model": "m", "device": "cpu", "seed": 0, "scale": 1.0, "reply_scale": 1.0,
            "machine": {"cpu": "x", "cores": 2}}  # fmt: skip
    path = tmp_path / "run.json"
    data = {"meta": meta, "runs": [on.to_json(), recompute.to_json()],
            "tiers_off": {"pressure": off.to_json()}}  # fmt: skip
    path.write_text(json.dumps(data))

    result = load_result(path)
    assert result.pairs == [(on, recompute)] and result.tiers_off == {"pressure": off}

    main(["--from-json", str(path), "--plot-copy", str(tmp_path / "p.png")])
    printed = capsys.readouterr().out
    assert "pressure, KV tiers on vs off" in printed
    assert "tiers  on: 2/2 later turns reused their history (100%), 0 history" in printed
    assert "tiers off: 0/2 later turns reused their history (0%), 58 history" in printed
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_json_without_a_tiers_off_run_still_loads(tmp_path):
    from bench.multiturn.suite import load_result

    on, recompute = pressure_run("cache", 29), pressure_run("recompute", 0)
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"meta": {}, "runs": [on.to_json(), recompute.to_json()]}))
    assert load_result(path).tiers_off == {}
