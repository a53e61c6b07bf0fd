"""The peer benchmark's pure logic (bench/peer_vllm.py), without vLLM or a server."""

from __future__ import annotations

import math

from bench.multiturn.records import TurnRecord
from bench.multiturn.service import apply_environment
from bench.multiturn.workloads import user_text
from bench.peer_vllm import (
    build_conversations,
    chat_template,
    decode_rate,
    engine_ttft_by_turn,
    format_report,
    summarize,
    thread_environment,
    token_gaps,
)


def _record(conversation: int, turn: int, ttft: float, total: float, cached: int) -> TurnRecord:
    return TurnRecord(
        conversation=conversation,
        turn=turn,
        user_tokens=60,
        max_tokens=32,
        ttft_s=ttft,
        total_s=total,
        input_tokens=100 * turn,
        cached_tokens=cached,
        output_tokens=32,
    )


def test_conversations_are_seeded_and_fixed_shape():
    a = build_conversations(4, num_turns=20, user_tokens=60, reply_tokens=32)
    assert a == build_conversations(4, num_turns=20, user_tokens=60, reply_tokens=32)
    assert len({c.seed for c in a}) == 4
    assert all(len(c.turns) == 20 for c in a)
    assert {(t.user_tokens, t.max_tokens) for c in a for t in c.turns} == {(60, 32)}
    assert all(len(user_text(a[0], t)) == 60 for t in range(1, 21))


def test_decode_rate_is_between_the_first_and_the_last_token():
    record = _record(0, 1, 0.5, 2.9, 0)
    record.token_times_s = [0.5 + 0.05 * i for i in range(32)]  # then 0.85 s to the usage event
    assert math.isclose(decode_rate(record), 20.0)
    assert [round(g, 9) for g in token_gaps([record, _record(0, 2, 1, 2, 0)])] == [0.05] * 31


def test_decode_rate_without_token_times_excludes_time_to_first_token():
    assert decode_rate(_record(0, 1, 0.5, 2.5, 0)) == 16.0
    assert math.isnan(decode_rate(_record(0, 1, 1.0, 1.0, 0)))
    assert math.isnan(decode_rate(TurnRecord(conversation=0, turn=1, user_tokens=1, max_tokens=1)))


def test_summary_medians_ratio_and_table():
    records = [
        _record(c, t, ttft=0.01 * t + 0.01 * c, total=1.0 + 0.01 * t, cached=90 * (t > 1))
        for c in range(2)
        for t in range(1, 21)
    ]
    s = summarize("kvthreads", 2, records, wall_s=10.0)
    assert s.num_turns == 40 and s.errors == 0 and s.output_tokens == 40 * 32
    assert math.isclose(s.ttft_by_turn[5], 0.055)
    assert math.isclose(s.ttft_ratio(20, 5), 0.205 / 0.055)
    assert math.isclose(s.ttft_late_median, (0.12 + 0.13) / 2)  # turns 4..20 of two conversations
    assert s.cached_by_turn[1] == 0 and s.cached_by_turn[2] == 90
    assert s.aggregate_tokens_per_s == 128.0
    text = format_report([s, summarize("vllm", 2, records, wall_s=20.0)])
    assert "kvthreads r1 TTFT ms" in text and "vllm r1 cached" in text
    lines = text.splitlines()
    assert lines[2].startswith("| turn") and len(lines[2]) == len(lines[3])  # padded columns
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("|")]
    assert ["vllm", "1", "2", "125", "3.73", "32.2", "-", "64.0", "1280", "0"] in cells


def test_chat_template_is_the_builtin_format():
    template = chat_template(("<|bos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"))
    import jinja2

    text = jinja2.Template(template).render(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        add_generation_prompt=True,
    )
    assert text == "<|bos|><|user|>hi<|end|><|assistant|>yo<|end|><|assistant|>"


def test_engine_ttft_from_the_ledger_gets_its_own_column_and_a_steadier_ratio():
    records = [
        _record(c, t, ttft=0.1 + 0.01 * t, total=1.0 + 0.01 * t, cached=90 * (t > 1))
        for c in range(2)
        for t in range(1, 21)
    ]
    for r in records:
        r.server = {"ttft_s": r.ttft_s - 0.005 * (r.conversation + 1)}  # the engine's part
    records[0].error = "HTTP 500"  # a failed turn has no say
    s = summarize("kvthreads", 2, records, wall_s=10.0)
    s.server_ttft_by_turn = engine_ttft_by_turn(records)
    assert math.isclose(s.server_ttft_by_turn[1], 0.11 - 0.010)  # conversation 1's only
    assert math.isclose(s.server_ttft_by_turn[5], 0.15 - 0.0075)
    assert math.isclose(s.ttft_window_ratio(20, 5), (0.28 + 0.29 + 0.30) / (0.14 + 0.15 + 0.16))
    text = format_report([s, summarize("vllm", 2, records, wall_s=20.0)])
    header = next(line for line in text.splitlines() if line.startswith("| turn"))
    assert "kvthreads r1 engine TTFT ms" in header and "vllm r1 engine" not in header
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()]
    assert ["5", "150", "500", "90", "143", "150", "500", "90"] in cells


def test_both_servers_get_one_wait_policy_or_none():
    env = {"OMP_WAIT_POLICY": "PASSIVE", "PATH": "/bin"}
    apply_environment(env, thread_environment(2, "default"))
    assert env == {"OMP_NUM_THREADS": "2", "PATH": "/bin"}  # each runtime's own
    apply_environment(env, thread_environment(3, "ACTIVE"))
    assert env == {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "ACTIVE", "PATH": "/bin"}


def test_a_phase_waits_for_the_machine_to_idle(monkeypatch):
    import bench.peer_vllm as peer

    assert 0.0 <= peer.machine_busy(0.05) <= 1.0  # read from /proc/stat
    busy = iter([0.9, 0.6, 0.05, 0.9])
    monkeypatch.setattr(peer, "machine_busy", lambda interval_s: next(busy))
    peer.wait_for_quiet_machine(limit_s=10.0)
    assert next(busy) == 0.9  # stopped at the first quiet sample
    monkeypatch.setattr(peer, "machine_busy", lambda interval_s: 1.0)
    assert peer.wait_for_quiet_machine(limit_s=0.0) < 0.5  # the limit holds
