"""Figures from the turn records: per-turn TTFT, fresh tokens, tokens computed, throughput, the
fresh-token check, eviction cost; and the tables the benchmark prints.

Standard library only, shared by the HTTP driver and the engine-level GPU script.

Fresh-token check. While a thread stays resident, turn k reuses everything turn k-1 computed:
its input plus its output except the last sampled token (sampled, never fed back). So the tokens
turn k must compute are exactly

    new(k) = input(k) - (input(k-1) + output(k-1) - 1)        new(1) = input(1)

and in `cache` mode fresh(k) == new(k) on every hit. In `recompute` mode fresh(k) == input(k).
On a miss (eviction) fresh(k) - new(k) is the history recomputed because of the miss.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass, field

from bench.multiturn.records import RunResult, TurnRecord

LATE_TURN = 4  # "turn 4 and later": where the history dwarfs the new message


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    if not values:
        return math.nan
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def conversations(run: RunResult) -> dict[int, list[TurnRecord]]:
    """Each conversation's successful turns, in turn order."""
    by_conversation: dict[int, list[TurnRecord]] = {}
    for record in sorted(run.turns, key=lambda r: (r.conversation, r.turn)):
        by_conversation.setdefault(record.conversation, []).append(record)
    return by_conversation


def expected_new_tokens(previous: TurnRecord | None, record: TurnRecord) -> int:
    """The tokens turn `record` must compute when the previous turn's KV is still resident."""
    if previous is None:
        return record.input_tokens
    return record.input_tokens - (previous.input_tokens + previous.output_tokens - 1)


@dataclass
class FreshCheck:
    checked: int = 0
    matched: int = 0
    mismatches: list[dict] = field(default_factory=list)  # the first few, for the report

    @property
    def ok(self) -> bool:
        return self.checked > 0 and self.checked == self.matched


def check_fresh_tokens(run: RunResult, keep: int = 5) -> FreshCheck:
    """cache: fresh == new tokens on every hit (and on turn 1); recompute: fresh == input."""
    check = FreshCheck()
    for turns in conversations(run).values():
        previous = None
        for record in turns:
            if not record.ok or (previous is not None and not previous.ok):
                previous = record
                continue
            if run.mode == "recompute":
                expected = record.input_tokens
            elif previous is None or record.cache_hit:
                expected = expected_new_tokens(previous, record)
            else:
                expected = None  # a miss: recomputation is expected, measured elsewhere
            if expected is not None:
                check.checked += 1
                if record.fresh_tokens == expected:
                    check.matched += 1
                elif len(check.mismatches) < keep:
                    check.mismatches.append(
                        {
                            "conversation": record.conversation,
                            "turn": record.turn,
                            "fresh": record.fresh_tokens,
                            "expected": expected,
                        }
                    )
            previous = record
    return check


@dataclass
class TurnStats:
    turn: int
    count: int
    ttft_p50: float  # client: request sent -> first text (SSE delta) received
    ttft_p90: float
    engine_ttft_p50: float  # server: turn queued in the engine -> first token sampled
    fresh_mean: float
    input_mean: float
    computed: int  # fresh + output tokens of every turn with this index


def per_turn(run: RunResult) -> dict[int, TurnStats]:
    groups: dict[int, list[TurnRecord]] = {}
    for record in run.turns:
        if record.ok:
            groups.setdefault(record.turn, []).append(record)
    stats = {}
    for turn in sorted(groups):
        records = groups[turn]
        ttfts = [r.ttft_s for r in records if r.ttft_s is not None]
        engine_ttfts = [r.server["ttft_s"] for r in records if "ttft_s" in r.server]
        stats[turn] = TurnStats(
            turn=turn,
            count=len(records),
            ttft_p50=percentile(ttfts, 50),
            ttft_p90=percentile(ttfts, 90),
            engine_ttft_p50=percentile(engine_ttfts, 50),
            fresh_mean=statistics.fmean(r.fresh_tokens for r in records),
            input_mean=statistics.fmean(r.input_tokens for r in records),
            computed=sum(r.fresh_tokens + r.output_tokens for r in records),
        )
    return stats


@dataclass
class RunSummary:
    profile: str
    mode: str
    concurrency: int
    turns: int
    errors: int
    wall_s: float
    turns_per_s: float
    output_tokens_per_s: float
    prefill_tokens: int  # fresh tokens, all turns
    decode_tokens: int  # output tokens, all turns
    input_tokens: int
    late_ttft_p50: float  # turns >= LATE_TURN
    late_ttft_p90: float
    late_engine_ttft_p50: float
    late_fresh_mean: float
    hit_ratio: float  # hits among turns >= 2 (turn 1 of a thread can never hit)
    miss_reasons: dict[str, int]
    recomputed_tokens: int  # history recomputed because of misses on turns >= 2
    fresh_check: FreshCheck

    @property
    def computed_tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens


def summarize(run: RunResult) -> RunSummary:
    ok = [r for r in run.turns if r.ok]
    late = [r for r in ok if r.turn >= LATE_TURN]
    late_ttfts = [r.ttft_s for r in late if r.ttft_s is not None]
    late_engine_ttfts = [r.server["ttft_s"] for r in late if "ttft_s" in r.server]
    later_turns = [r for r in ok if r.turn >= 2]
    recomputed = 0
    for turns in conversations(run).values():
        for previous, record in zip(turns, turns[1:], strict=False):
            if previous.ok and record.ok and not record.cache_hit:
                recomputed += max(0, record.fresh_tokens - expected_new_tokens(previous, record))
    output = sum(r.output_tokens for r in ok)
    wall = run.wall_s if run.wall_s > 0 else math.nan
    return RunSummary(
        profile=run.profile,
        mode=run.mode,
        concurrency=run.concurrency,
        turns=len(ok),
        errors=len(run.turns) - len(ok),
        wall_s=run.wall_s,
        turns_per_s=len(ok) / wall,
        output_tokens_per_s=output / wall,
        prefill_tokens=sum(r.fresh_tokens for r in ok),
        decode_tokens=output,
        input_tokens=sum(r.input_tokens for r in ok),
        late_ttft_p50=percentile(late_ttfts, 50),
        late_ttft_p90=percentile(late_ttfts, 90),
        late_engine_ttft_p50=percentile(late_engine_ttfts, 50),
        late_fresh_mean=statistics.fmean(r.fresh_tokens for r in late) if late else math.nan,
        hit_ratio=(
            sum(1 for r in later_turns if r.cache_hit) / len(later_turns)
            if later_turns
            else math.nan
        ),
        miss_reasons=dict(Counter(r.miss_reason for r in ok if r.miss_reason)),
        recomputed_tokens=recomputed,
        fresh_check=check_fresh_tokens(run),
    )


def speedup(slow: float, fast: float) -> float:
    """slow / fast, NaN when either is missing or fast is zero."""
    if math.isnan(slow) or math.isnan(fast) or fast <= 0:
        return math.nan
    return slow / fast


# ---- formatting ---------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:,.0f}"


def _num(value: float, digits: int = 1) -> str:
    return "-" if math.isnan(value) else f"{value:,.{digits}f}"


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table that also reads well in a terminal (columns padded)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"] + [
        line(r) for r in rows
    ]


def format_profile(cache: RunResult, recompute: RunResult) -> str:
    """The per-turn table of one profile, both modes side by side, and its totals."""
    c_turns, r_turns = per_turn(cache), per_turn(recompute)
    c_sum, r_sum = summarize(cache), summarize(recompute)
    header = [
        "turn",
        "n",
        "TTFT ms: cache p50",
        "p90",
        "recompute p50",
        "p90",
        "speedup",
        "engine TTFT ms: cache p50",
        "recompute p50",
        "speedup",
        "fresh/turn: cache",
        "recompute",
    ]
    rows = []
    for turn in sorted(set(c_turns) | set(r_turns)):
        c, r = c_turns.get(turn), r_turns.get(turn)
        both = c is not None and r is not None
        rows.append(
            [
                str(turn),
                str(c.count if c else r.count),
                _ms(c.ttft_p50) if c else "-",
                _ms(c.ttft_p90) if c else "-",
                _ms(r.ttft_p50) if r else "-",
                _ms(r.ttft_p90) if r else "-",
                _ratio(speedup(r.ttft_p50, c.ttft_p50)) if both else "-",
                _ms(c.engine_ttft_p50) if c else "-",
                _ms(r.engine_ttft_p50) if r else "-",
                _ratio(speedup(r.engine_ttft_p50, c.engine_ttft_p50)) if both else "-",
                _num(c.fresh_mean) if c else "-",
                _num(r.fresh_mean) if r else "-",
            ]
        )
    late_gain = speedup(r_sum.late_ttft_p50, c_sum.late_ttft_p50)
    late_engine_gain = speedup(r_sum.late_engine_ttft_p50, c_sum.late_engine_ttft_p50)
    lines = [
        f"## {cache.profile}  ({len(conversations(cache))} conversations, {c_sum.turns} turns, "
        f"concurrency {cache.concurrency}, seed {cache.seed})",
        "",
        *_table(header, rows),
        "",
        f"turns >= {LATE_TURN}: TTFT p50 cache {_ms(c_sum.late_ttft_p50)} ms, recompute "
        f"{_ms(r_sum.late_ttft_p50)} ms -> {_ratio(late_gain)} faster (engine "
        f"{_ms(c_sum.late_engine_ttft_p50)} vs {_ms(r_sum.late_engine_ttft_p50)} ms -> "
        f"{_ratio(late_engine_gain)}); fresh tokens/turn {_num(c_sum.late_fresh_mean)} vs "
        f"{_num(r_sum.late_fresh_mean)}",
    ]
    for s in (c_sum, r_sum):
        lines.append(
            f"{s.mode:>9}: computed {s.computed_tokens:,} tokens (prefill {s.prefill_tokens:,} + "
            f"decode {s.decode_tokens:,}); {_num(s.turns_per_s, 2)} turns/s, "
            f"{_num(s.output_tokens_per_s)} output tokens/s; replies "
            f"{_num(s.decode_tokens / s.turns if s.turns else math.nan, 0)} tokens on average; "
            f"wall {s.wall_s:.1f} s" + (f"; {s.errors} FAILED turns" if s.errors else "")
        )
    lines.append(_fresh_line(c_sum))
    lines.append(_fresh_line(r_sum))
    if c_sum.miss_reasons.keys() - {"new_thread"} or cache.profile == "pressure":
        lines.append(_eviction_line(c_sum, cache.settings))
    return "\n".join(lines)


def _fresh_line(s: RunSummary) -> str:
    what = "fresh == new tokens (on hits)" if s.mode == "cache" else "fresh == input tokens"
    verdict = "OK" if s.fresh_check.ok else "MISMATCH"
    line = f"{s.mode:>9}: {what}: {s.fresh_check.matched}/{s.fresh_check.checked} {verdict}"
    if s.fresh_check.mismatches:
        line += f" e.g. {s.fresh_check.mismatches[0]}"
    return line


def _eviction_line(s: RunSummary, settings: dict) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(s.miss_reasons.items())) or "none"
    share = s.recomputed_tokens / s.prefill_tokens if s.prefill_tokens else math.nan
    # The server's own counters, when the run recorded them (threads evicted, turns preempted).
    counted = "".join(
        f"; {name} {int(settings[name])}"
        for name in ("evictions", "preemptions")
        if name in settings
    )
    return (
        f"{s.mode:>9}: hit ratio {_num(s.hit_ratio * 100)}% of turns >= 2; misses: {reasons}; "
        f"evictions recomputed {s.recomputed_tokens:,} history tokens "
        f"({_num(share * 100)}% of prefill){counted}"
    )


def format_summary(pairs: list[tuple[RunResult, RunResult]]) -> str:
    """One line per profile and mode: the headline table for the terminal and the README."""
    header = [
        "profile",
        "mode",
        "turns",
        f"TTFT p50 turn>={LATE_TURN} ms",
        "p90",
        "speedup",
        "engine TTFT p50 ms",
        "speedup",
        f"fresh/turn (>={LATE_TURN})",
        "tokens computed",
        "turns/s",
        "out tok/s",
        "hit ratio",
        "fresh check",
    ]
    rows = []
    for cache, recompute in pairs:
        c_sum, r_sum = summarize(cache), summarize(recompute)
        gain = speedup(r_sum.late_ttft_p50, c_sum.late_ttft_p50)
        engine_gain = speedup(r_sum.late_engine_ttft_p50, c_sum.late_engine_ttft_p50)
        for s in (c_sum, r_sum):
            rows.append(
                [
                    s.profile,
                    s.mode,
                    str(s.turns) + (f" ({s.errors} failed)" if s.errors else ""),
                    _ms(s.late_ttft_p50),
                    _ms(s.late_ttft_p90),
                    _ratio(gain) if s.mode == "cache" else "1.0x",
                    _ms(s.late_engine_ttft_p50),
                    _ratio(engine_gain) if s.mode == "cache" else "1.0x",
                    _num(s.late_fresh_mean),
                    f"{s.computed_tokens:,}",
                    _num(s.turns_per_s, 2),
                    _num(s.output_tokens_per_s),
                    f"{s.hit_ratio * 100:.0f}%" if not math.isnan(s.hit_ratio) else "-",
                    f"{s.fresh_check.matched}/{s.fresh_check.checked}"
                    + ("" if s.fresh_check.ok else " !"),
                ]
            )
    return "\n".join(_table(header, rows))
