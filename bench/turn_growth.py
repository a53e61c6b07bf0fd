"""What the thread mirror buys, at engine level: the peer benchmark's conversations through the
AsyncLLMEngine, CPU attention reading the thread mirror against reading the pool itself.

    .venv/bin/python -m bench.turn_growth [--turns 20] [--rounds 2] [--concurrency 1 4]

The conversations of bench/peer_vllm.py (turns of --user-tokens new tokens and --reply-tokens
greedy replies on the `builtin-bench-random` model, float32, every core), 1 and 4 at once, each
turn sent as soon as the conversation's last one ended. Two engines in one process, played in
alternation, --rounds times each:

    mirror   the engine as built (app/engine/network/attention/thread_mirror.py)
    pool     a runner not told whose the KV is: the CPU backend's paths over the pool (SDPA over
             each sequence's blocks for a turn's prefill, the batch's keys gathered from the pool
             for decodes), what attention was before the mirror, minus its decode-batch mirror

Prints, per mode and concurrency, the mean TTFT of turns 4-6 and 18-20 and their ratio (the
issue's bar: turn 20 within 1.3x of turn 5), the median TTFT of turns 4-20, and decode tokens/s
per request (output tokens / (total - TTFT), the median); JSON to bench/out/turn_growth.json.
Both engines are built in a thread that ends (runtime_factory.call_in_own_thread says why).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import torch

from app.engine.loading.loader import resolve_model
from app.engine.runtime.async_engine import AsyncLLMEngine
from app.engine.runtime.llm_engine import LLMEngine
from app.engine.runtime.types import SamplingParams
from app.threads.runtime_factory import call_in_own_thread
from bench.engine_turns import drain_timed

MODEL_NAME = "builtin-bench-random"
OUT = Path(__file__).parent / "out" / "turn_growth.json"
MODES = ("pool", "mirror")


def build_engines(kv_cache_mb: int) -> dict[str, LLMEngine]:
    """Both engines, built in a thread that ends (no OpenMP team left on this one)."""

    def build() -> dict[str, LLMEngine]:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        loaded = resolve_model(MODEL_NAME, device="cpu", dtype=torch.float32)
        engines = {}
        for mode in MODES:
            engine = LLMEngine.from_loaded(loaded, kv_cache_mb=kv_cache_mb, max_num_seqs=32)
            if mode == "pool":
                engine.runner.block_generations = None  # the backend is not told whose KV
            engines[mode] = engine
        return engines

    return call_in_own_thread(build, name="bench-load")


async def conversation(
    bridge: AsyncLLMEngine, key: str, args: argparse.Namespace, seed: int
) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=args.reply_tokens, temperature=0.0, ignore_eos=True)
    history: list[int] = []
    turns = []
    for n in range(1, args.turns + 1):
        new = torch.randint(0, 256, (args.user_tokens,), generator=gen).tolist()
        start = time.perf_counter()
        stream = bridge.generate(key, history, new, params, first_turn=n == 1)
        ttft, finish = await drain_timed(stream, start)
        total = time.perf_counter() - start
        bridge.commit_turn(key)
        assert ttft is not None and finish is not None
        output = len(finish.token_ids)
        turns.append(
            {
                "turn": n,
                "ttft_s": ttft,
                "decode_tok_s": output / (total - ttft),
                "cached_tokens": finish.counts.cached_tokens,
                "reply": finish.token_ids,
            }
        )
        history = history + new + finish.token_ids
    return turns


def play(engine: LLMEngine, concurrency: int, args: argparse.Namespace, tag: str) -> list[dict]:
    bridge = AsyncLLMEngine(engine)
    bridge.start()

    async def everyone() -> list[list[dict]]:
        return await asyncio.gather(
            *(conversation(bridge, f"{tag}-{i}", args, seed=i) for i in range(concurrency))
        )

    try:
        return [turn for conv in asyncio.run(everyone()) for turn in conv]
    finally:
        bridge.shutdown()


def summary(turns: list[dict]) -> dict:
    def mean_ttft(lo: int, hi: int) -> float:
        return statistics.mean(t["ttft_s"] for t in turns if lo <= t["turn"] <= hi)

    early, late = mean_ttft(4, 6), mean_ttft(18, 20)
    return {
        "ttft_4_6_ms": early * 1e3,
        "ttft_18_20_ms": late * 1e3,
        "ratio": late / early,
        "median_ttft_ms": statistics.median(t["ttft_s"] for t in turns if t["turn"] >= 4) * 1e3,
        "decode_tok_s": statistics.median(t["decode_tok_s"] for t in turns if t["turn"] >= 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--user-tokens", type=int, default=60)
    parser.add_argument("--reply-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-cache-mb", type=int, default=1024)
    args = parser.parse_args()
    if args.turns < 20:
        parser.error("--turns must be at least 20 (turns 18-20 are compared with 4-6)")

    engines = build_engines(args.kv_cache_mb)
    results: dict[str, list] = {f"{mode}-{c}": [] for mode in MODES for c in args.concurrency}
    replies: dict[str, list] = {}
    for round_index in range(args.rounds):
        for concurrency in args.concurrency:
            for mode in MODES:
                tag = f"r{round_index}-{mode}-{concurrency}"
                turns = play(engines[mode], concurrency, args, tag)
                results[f"{mode}-{concurrency}"].append(summary(turns))
                replies.setdefault(f"{round_index}-{concurrency}", []).append(
                    sorted((t["turn"], t["reply"]) for t in turns)
                )
    for key, pair in replies.items():
        if pair[0] != pair[1]:
            raise RuntimeError(f"round/concurrency {key}: the two modes replied differently")

    print(
        f"{MODEL_NAME}, float32, CPU, {torch.get_num_threads()} threads; {args.turns} turns of "
        f"{args.user_tokens} new tokens and {args.reply_tokens}-token replies; "
        f"{args.rounds} rounds, modes alternating (values: round 1 ; round 2 ...)"
    )
    print(
        f"{'mode':>6} {'convs':>5} | {'TTFT 4-6 ms':>14} {'TTFT 18-20 ms':>14} "
        f"{'18-20 / 4-6':>12} | {'median TTFT ms':>14} | {'decode tok/s':>13}"
    )

    def cells(rows: list[dict], field: str, fmt: str) -> str:
        return " ; ".join(format(row[field], fmt) for row in rows)

    for concurrency in args.concurrency:
        for mode in MODES:
            rows = results[f"{mode}-{concurrency}"]
            print(
                f"{mode:>6} {concurrency:>5} | {cells(rows, 'ttft_4_6_ms', '.1f'):>14} "
                f"{cells(rows, 'ttft_18_20_ms', '.1f'):>14} {cells(rows, 'ratio', '.2f'):>12} | "
                f"{cells(rows, 'median_ttft_ms', '.1f'):>14} | "
                f"{cells(rows, 'decode_tok_s', '.1f'):>13}"
            )
    print("The replies of the two modes are the same, turn for turn.")
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
