"""The multi-turn benchmark's own logic: workloads, play order, the figures and the fresh check."""

from __future__ import annotations

import asyncio
import json
import math
import re
import subprocess
import sys

import pytest

from bench.multiturn.driver import play
from bench.multiturn.records import RunResult, TurnRecord
from bench.multiturn.report import (
    check_fresh_tokens,
    expected_new_tokens,
    format_profile,
    format_summary,
    per_turn,
    percentile,
    summarize,
)
from bench.multiturn.workloads import (
    PROFILES,
    Span,
    build_workload,
    user_ids,
    user_text,
)

# ---- workloads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_same_seed_same_workload_other_seed_other_workload(name):
    assert build_workload(name, seed=3) == build_workload(name, seed=3)
    assert build_workload(name, seed=3) != build_workload(name, seed=4)


def test_profiles_have_the_shapes_the_issue_asks_for():
    chat = build_workload("chat", seed=0, scale=4)
    assert all(2 <= len(c.turns) <= 8 for c in chat.conversations)
    user = [t.user_tokens for c in chat.conversations for t in c.turns]
    replies = [t.max_tokens for c in chat.conversations for t in c.turns]
    assert 55 <= sum(user) / len(user) <= 90  # "about 70 tokens"
    assert 160 <= sum(replies) / len(replies) <= 240  # "about 200 tokens"

    long = build_workload("long", seed=0, scale=4)
    assert all(2000 <= c.turns[0].user_tokens <= 8000 for c in long.conversations)
    assert all(t.user_tokens < 100 for c in long.conversations for t in c.turns[1:])
    assert all(len(c.turns) >= 4 for c in long.conversations)  # there is a turn 4 to measure

    agent = build_workload("agent", seed=0)
    assert all(len(c.turns) >= 10 for c in agent.conversations)

    pressure = build_workload("pressure", seed=0)
    assert pressure.profile.interleaved and len(pressure.conversations) >= 8


def test_scale_multiplies_conversations_and_reply_scale_shrinks_replies():
    base = build_workload("chat", seed=1)
    assert len(build_workload("chat", seed=1, scale=2).conversations) == 2 * len(base.conversations)
    assert len(build_workload("chat", seed=1, scale=0.01).conversations) == 1
    short = build_workload("chat", seed=1, reply_scale=0.1)
    assert max(t.max_tokens for c in short.conversations for t in c.turns) <= 30


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nope",), "unknown profile 'nope'"),
        (("chat", 0), "must be positive"),
    ],
)
def test_bad_workload_arguments_are_refused(args, message):
    name, *rest = args
    kwargs = {"scale": rest[0]} if rest else {}
    with pytest.raises(ValueError, match=message):
        build_workload(name, **kwargs)


def test_span_refuses_an_inverted_range():
    with pytest.raises(ValueError, match="low <= mode <= high"):
        Span(10, 5, 7)


def test_user_text_has_exactly_the_asked_length_in_ascii():
    workload = build_workload("long", seed=2)
    conversation = workload.conversations[0]
    for turn in range(1, len(conversation.turns) + 1):
        text = user_text(conversation, turn)
        assert len(text) == conversation.turns[turn - 1].user_tokens
        assert text.isascii() and text == user_text(conversation, turn)
    assert user_text(conversation, 1) != user_text(workload.conversations[1], 1)


def test_user_ids_have_the_asked_length_within_the_range():
    conversation = build_workload("agent", seed=0).conversations[0]
    ids = user_ids(conversation, 2, 100, 200)
    assert len(ids) == conversation.turns[1].user_tokens
    assert all(100 <= i < 200 for i in ids)
    with pytest.raises(ValueError):
        user_ids(conversation, 2, 5, 5)


def test_workloads_records_report_and_driver_import_only_the_standard_library():
    # The GPU script imports these on a machine that has torch and nothing else.
    code = (
        "import sys; import bench.multiturn.workloads, bench.multiturn.report, "
        "bench.multiturn.driver; "
        "bad = {'numpy', 'httpx', 'msgspec', 'torch', 'matplotlib', 'litestar', 'app'} "
        "& {m.split('.')[0] for m in sys.modules}; print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- the driver ---------------------------------------------------------------------------------


class FakeSender:
    """Answers every turn after a short sleep, like a resident cache: the history grows by the
    user message, and the previous reply is reused except its last token."""

    def __init__(self, *, fail_on: tuple[int, int] | None = None) -> None:
        self.in_flight = 0
        self.max_in_flight = 0
        self.order: list[tuple[int, int]] = []
        self.log_length: dict[str, int] = {}
        self.fail_on = fail_on

    async def create_thread(self, conversation):
        thread_id = f"t{conversation.index}"
        self.log_length[thread_id] = 0
        return thread_id

    async def send_turn(self, thread_id, conversation, turn):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.order.append((conversation.index, turn))
        try:
            await asyncio.sleep(0.001)
            if (conversation.index, turn) == self.fail_on:
                raise RuntimeError("boom")
            spec = conversation.turns[turn - 1]
            prompt = self.log_length[thread_id] + spec.user_tokens
            cached = max(0, self.log_length[thread_id] - 1)
            self.log_length[thread_id] = prompt + spec.max_tokens
            return TurnRecord(
                conversation=conversation.index,
                turn=turn,
                user_tokens=spec.user_tokens,
                max_tokens=spec.max_tokens,
                thread_id=thread_id,
                ttft_s=0.001,
                total_s=0.002,
                input_tokens=prompt,
                cached_tokens=cached,
                fresh_tokens=prompt - cached,
                output_tokens=spec.max_tokens,
                cache_hit=turn > 1,
                miss_reason=None if turn > 1 else "new_thread",
            )
        finally:
            self.in_flight -= 1


def test_play_keeps_each_conversation_in_order_within_the_concurrency():
    workload = build_workload("agent", seed=0, scale=2)
    sender = FakeSender()
    run = asyncio.run(play(workload, sender, mode="cache", concurrency=3))
    assert sender.max_in_flight == 3
    assert len(run.turns) == workload.num_turns
    for conversation in workload.conversations:
        turns = [t for c, t in sender.order if c == conversation.index]
        assert turns == list(range(1, len(conversation.turns) + 1))
    assert check_fresh_tokens(run).ok


def test_play_interleaved_finishes_each_round_before_the_next():
    workload = build_workload("pressure", seed=0)
    sender = FakeSender()
    asyncio.run(play(workload, sender, mode="cache", concurrency=4))
    rounds = [t for _, t in sender.order]
    assert rounds == sorted(rounds)  # every turn 1, then every turn 2, ...
    assert rounds.count(1) == len(workload.conversations)
    assert sender.max_in_flight == 4


def test_play_records_a_failed_turn_and_goes_on():
    workload = build_workload("chat", seed=0, scale=0.25)
    sender = FakeSender(fail_on=(0, 2))
    run = asyncio.run(play(workload, sender, mode="cache", concurrency=2))
    failed = [r for r in run.turns if not r.ok]
    assert [(r.conversation, r.turn) for r in failed] == [(0, 2)]
    assert "RuntimeError: boom" in failed[0].error and failed[0].thread_id == "t0"
    assert len(run.turns) == workload.num_turns
    assert summarize(run).errors == 1


def test_play_refuses_a_bad_mode_or_concurrency():
    workload = build_workload("chat", seed=0)
    with pytest.raises(ValueError, match="mode"):
        asyncio.run(play(workload, FakeSender(), mode="fast", concurrency=1))
    with pytest.raises(ValueError, match="concurrency"):
        asyncio.run(play(workload, FakeSender(), mode="cache", concurrency=0))


# ---- the figures ----------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy_linear():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10, 0, 5], 90) == pytest.approx(9.0)
    assert percentile([7], 90) == 7
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1], 101)


def record(conversation, turn, *, input_tokens, fresh, output, hit, reason=None, ttft=0.1):
    return TurnRecord(
        conversation=conversation,
        turn=turn,
        user_tokens=0,
        max_tokens=output,
        thread_id=f"t{conversation}",
        ttft_s=ttft,
        total_s=ttft * 2,
        input_tokens=input_tokens,
        cached_tokens=input_tokens - fresh,
        fresh_tokens=fresh,
        output_tokens=output,
        cache_hit=hit,
        miss_reason=reason,
    )


def run_of(mode, turns, profile="chat", wall=2.0):
    return RunResult(profile=profile, mode=mode, concurrency=2, seed=0, wall_s=wall, turns=turns)


def test_expected_new_tokens_reuses_all_but_the_last_sampled_token():
    first = record(0, 1, input_tokens=80, fresh=80, output=20, hit=False, reason="new_thread")
    second = record(0, 2, input_tokens=80 + 20 + 1 + 75, fresh=77, output=20, hit=True)
    assert expected_new_tokens(None, first) == 80
    # 20 replies tokens + 1 end-of-turn token appended by the chat format + 75 user tokens,
    # plus the last sampled token, which was never fed through the model.
    assert expected_new_tokens(first, second) == 77


def test_fresh_check_counts_hits_and_reports_mismatches():
    turns = [
        record(0, 1, input_tokens=100, fresh=100, output=10, hit=False, reason="new_thread"),
        record(0, 2, input_tokens=150, fresh=41, output=10, hit=True),  # 150 - 109 = 41: right
        record(0, 3, input_tokens=200, fresh=45, output=10, hit=True),  # expected 41: wrong
        record(0, 4, input_tokens=250, fresh=250, output=10, hit=False, reason="evicted"),
    ]
    check = check_fresh_tokens(run_of("cache", turns))
    assert (check.checked, check.matched, check.ok) == (3, 2, False)
    assert check.mismatches == [{"conversation": 0, "turn": 3, "fresh": 45, "expected": 41}]

    recompute = [
        record(0, 1, input_tokens=100, fresh=100, output=10, hit=False, reason="disabled"),
        record(0, 2, input_tokens=150, fresh=150, output=10, hit=False, reason="disabled"),
    ]
    assert check_fresh_tokens(run_of("recompute", recompute)).ok


def test_summary_counts_hits_evictions_and_throughput():
    turns = [
        record(0, 1, input_tokens=100, fresh=100, output=10, hit=False, reason="new_thread"),
        record(0, 2, input_tokens=150, fresh=41, output=10, hit=True),
        record(0, 3, input_tokens=200, fresh=200, output=10, hit=False, reason="evicted"),
        record(0, 4, input_tokens=250, fresh=41, output=10, hit=True, ttft=0.3),
        record(1, 1, input_tokens=90, fresh=90, output=10, hit=False, reason="new_thread"),
    ]
    s = summarize(run_of("cache", turns, profile="pressure", wall=2.0))
    assert s.turns == 5 and s.errors == 0
    assert s.hit_ratio == pytest.approx(2 / 3)
    assert s.miss_reasons == {"new_thread": 2, "evicted": 1}
    assert s.recomputed_tokens == 200 - 41  # turn 3 needed 41, computed 200
    assert s.prefill_tokens == 100 + 41 + 200 + 41 + 90 and s.decode_tokens == 50
    assert s.turns_per_s == pytest.approx(2.5) and s.output_tokens_per_s == pytest.approx(25)
    assert s.late_ttft_p50 == pytest.approx(0.3) and s.late_fresh_mean == 41
    assert s.fresh_check.ok  # turn 1s and the two hits

    stats = per_turn(run_of("cache", turns))
    assert stats[1].count == 2 and stats[1].fresh_mean == 95 and stats[1].computed == 210


def test_tables_show_both_modes_and_the_speedup():
    cache = [
        record(0, t, input_tokens=100 * t, fresh=100 if t == 1 else 91, output=10, hit=t > 1,
               reason="new_thread" if t == 1 else None, ttft=0.05)
        for t in range(1, 6)
    ]  # fmt: skip
    recompute = [
        record(0, t, input_tokens=100 * t, fresh=100 * t, output=10, hit=False,
               reason="disabled", ttft=0.05 * 2 * t)
        for t in range(1, 6)
    ]  # fmt: skip
    pair = (run_of("cache", cache), run_of("recompute", recompute))
    text = format_profile(*pair)
    assert re.search(r"^\|\s+5 \|.*\|\s+10\.0x \|", text, re.M)  # turn 5: 500 ms against 50
    assert "fresh == new tokens (on hits): 5/5 OK" in text
    summary = format_summary([pair])
    assert summary.count("\n") == 3  # header, rule, two rows
    assert "9.0x" in summary  # turns >= 4: median of 400 and 500 ms against 50 ms


def test_run_result_round_trips_through_json():
    run = run_of("cache", [record(0, 1, input_tokens=5, fresh=5, output=1, hit=False)])
    assert RunResult.from_json(json.loads(json.dumps(run.to_json()))) == run


def test_plot_writes_a_png(tmp_path):
    from bench.multiturn.plots import plot_runs

    cache = [record(0, t, input_tokens=10 * t, fresh=10, output=2, hit=t > 1) for t in (1, 2, 3)]
    recompute = [
        record(0, t, input_tokens=10 * t, fresh=10 * t, output=2, hit=False) for t in (1, 2, 3)
    ]
    path = plot_runs([(run_of("cache", cache), run_of("recompute", recompute))], tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- pool sizing --------------------------------------------------------------------------------


def test_resident_pool_holds_every_conversation_and_pressure_pool_does_not():
    from bench.multiturn import sizing

    chat = build_workload("chat", seed=0)
    for c in chat.conversations:
        log = 1 + sum(t.user_tokens + 3 + t.max_tokens + 1 for t in c.turns)
        assert sizing.conversation_tokens(c) == log
    assert sizing.resident_pool_tokens([chat]) >= sizing.live_tokens(chat)

    pressure = build_workload("pressure", seed=0)
    pool = sizing.pressure_pool_tokens(pressure, concurrency=4, fraction=0.5)
    assert sizing.in_flight_tokens(pressure, 4) < pool < sizing.live_tokens(pressure)
    assert sizing.pool_mb(43, 24576) == 2  # 43 tokens of 24 KiB: just over one MiB


def test_pressure_pool_refuses_a_workload_that_cannot_evict():
    from bench.multiturn import sizing

    small = build_workload("pressure", seed=0, scale=0.25)
    with pytest.raises(ValueError, match="eviction happens"):
        sizing.pressure_pool_tokens(small, concurrency=4, fraction=0.5)
    with pytest.raises(ValueError, match="fraction"):
        sizing.pressure_pool_tokens(small, concurrency=1, fraction=1.5)


# ---- the HTTP client ------------------------------------------------------------------------------


async def _lines(*lines):
    for line in lines:
        yield line


def test_sse_parser_follows_the_event_stream_rules():
    from bench.multiturn.client import iter_sse

    async def collect():
        stream = _lines(": keep-alive", "event: delta", 'data: {"text": "a"}', "",
                        "data: line1", "data: line2", "", "event: done", "data: {}")  # fmt: skip
        return [(e.event, e.data) async for e in iter_sse(stream)]

    assert asyncio.run(collect()) == [
        ("delta", '{"text": "a"}'),
        ("message", "line1\nline2"),
        ("done", "{}"),
    ]


def _sse(*events):
    return b"".join(
        b"event: " + name.encode() + b"\ndata: " + json.dumps(data).encode() + b"\n\n"
        for name, data in events
    )


DONE = {
    "thread_id": "thr_1",
    "message": {"finish_reason": "length", "content": "ab"},
    "usage": {"input_tokens": 80, "cached_tokens": 0, "fresh_tokens": 80, "output_tokens": 2,
              "cost": "0.0001"},
    "cache": {"hit": False, "miss_reason": "new_thread"},
}  # fmt: skip


def _send_with(handler):
    import httpx

    from bench.multiturn.client import HttpSender

    async def go():
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            conversation = build_workload("chat", seed=0).conversations[0]
            return await HttpSender(client).send_turn("thr_1", conversation, 1)

    return asyncio.run(go())


def test_http_sender_times_the_first_delta_and_reads_usage_from_done():
    import httpx

    bodies = []

    def handler(request):
        bodies.append(json.loads(request.content))
        events = _sse(("delta", {"text": "a"}), ("delta", {"text": "b"}), ("done", DONE))
        return httpx.Response(200, content=events)

    record = _send_with(handler)
    assert record.ok and record.ttft_s is not None and record.total_s >= record.ttft_s
    assert (record.input_tokens, record.fresh_tokens, record.output_tokens) == (80, 80, 2)
    assert (record.cache_hit, record.miss_reason, record.finish_reason) == (
        False,
        "new_thread",
        "length",
    )
    conversation = build_workload("chat", seed=0).conversations[0]
    assert bodies[0]["stream"] is True and bodies[0]["content"] == user_text(conversation, 1)
    assert bodies[0]["seed"] == conversation.sampling_seed(1)


def test_http_sender_retries_a_busy_thread_and_reports_errors():
    import httpx

    answers = [
        httpx.Response(409, json={"error": {"type": "thread_busy", "message": "busy"}}),
        httpx.Response(200, content=_sse(("delta", {"text": "a"}), ("done", DONE))),
    ]
    record = _send_with(lambda request: answers.pop(0))
    assert record.ok and record.busy_retries == 1

    record = _send_with(
        lambda request: httpx.Response(413, json={"error": {"type": "too_large", "message": "no"}})
    )
    assert record.error == "HTTP 413 too_large: no"

    failed = _sse(("delta", {"text": "a"}), ("error", {"error": {"type": "x", "message": "y"}}))
    record = _send_with(lambda request: httpx.Response(200, content=failed))
    assert record.error == "x: y"

    cut = _sse(("delta", {"text": "a"}))
    record = _send_with(lambda request: httpx.Response(200, content=cut))
    assert "without its final" in record.error


def test_metrics_parser_keeps_the_kv_samples():
    from bench.multiturn.suite import parse_metrics

    text = (
        "# HELP kvthreads_kv_evictions_total x\n"
        "kvthreads_kv_evictions_total 3\n"
        'kvthreads_kv_misses_total{reason="evicted"} 2\n'
        "kvthreads_ledger_turns_total 9\n"
    )
    assert parse_metrics(text) == {
        "kvthreads_kv_evictions_total": 3.0,
        'kvthreads_kv_misses_total{reason="evicted"}': 2.0,
    }


def test_cpu_sizes_keep_the_issue_shapes():
    from bench.multiturn.suite import CPU_PROFILES, DEFAULT_CONCURRENCY

    assert set(CPU_PROFILES) == set(PROFILES) == set(DEFAULT_CONCURRENCY)
    chat = CPU_PROFILES["chat"]
    assert chat.num_turns.low >= 2 and chat.num_turns.high == 8
    assert chat.user_tokens.mode == 70
    # Asked at ~300 so that replies cut short by the random model's end token average ~200.
    assert 190 <= 320 * (1 - math.exp(-chat.reply_tokens.mode / 320)) <= 210
    assert CPU_PROFILES["long"].first_user_tokens.low >= 2000
    assert CPU_PROFILES["agent"].num_turns.low >= 10
    assert CPU_PROFILES["pressure"].interleaved
