"""The multi-turn benchmark's tiers comparison: which later turns reused their whole history."""

from __future__ import annotations

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
