"""Histograms of committed turns, for /metrics: latency and size, plain floats and ints.

    metrics = TurnMetrics()
    metrics.observe(timings, prompt_tokens=59, generated_tokens=8)   # at commit_turn
    metrics.snapshot()["ttft_seconds"].counts                         # cumulative per bucket

Observed when a turn commits (as the ledger counts turns), from the sequence's timings: queue
(arrival to first scheduled), time to first token, total, and time per output token (the decode
time after the first token, over the tokens that followed it).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
TOKENS = (16, 64, 256, 1024, 4096, 16384, 65536)


@dataclass(frozen=True)
class HistogramSnapshot:
    buckets: tuple[float, ...]  # upper bounds; +Inf is implied
    counts: tuple[int, ...]  # cumulative, one per bound, then +Inf (== count)
    sum: float
    count: int


class Histogram:
    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)  # per bucket, not cumulative; last: +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.buckets, value)] += 1
        self._sum += value

    def snapshot(self) -> HistogramSnapshot:
        cumulative, total = [], 0
        for n in self._counts:
            total += n
            cumulative.append(total)
        return HistogramSnapshot(self.buckets, tuple(cumulative), self._sum, total)


class TurnMetrics:
    """One histogram per quantity; `observe` is called under the engine's lock."""

    def __init__(self) -> None:
        self.histograms = {
            "queue_seconds": Histogram(SECONDS),
            "ttft_seconds": Histogram(SECONDS),
            "tpot_seconds": Histogram(PER_TOKEN_SECONDS),
            "turn_seconds": Histogram(SECONDS),
            "input_tokens": Histogram(TOKENS),
            "output_tokens": Histogram(TOKENS),
        }

    def observe(
        self, timings: Mapping[str, float], *, prompt_tokens: int, generated_tokens: int
    ) -> None:
        h = self.histograms
        h["input_tokens"].observe(prompt_tokens)
        h["output_tokens"].observe(generated_tokens)
        if (queue := timings.get("queue_s")) is not None:
            h["queue_seconds"].observe(queue)
        ttft, total = timings.get("ttft_s"), timings.get("total_s")
        if ttft is not None:
            h["ttft_seconds"].observe(ttft)
        if total is not None:
            h["turn_seconds"].observe(total)
        if ttft is not None and total is not None and generated_tokens > 1:
            h["tpot_seconds"].observe(max(0.0, total - ttft) / (generated_tokens - 1))

    def snapshot(self) -> dict[str, HistogramSnapshot]:
        return {name: h.snapshot() for name, h in self.histograms.items()}
