"""Time to first token of a late turn in a long conversation: resident KV versus recompute.

    .venv/bin/python -m bench.ttft_cache [--history 2000] [--turns 4] [--user-tokens 16]

One conversation on the benchmark-size built-in model, through the AsyncLLMEngine as the service
drives it: turn 1 sends a document of about --history tokens, every later turn a short user
message (--user-tokens) and gets a reply of --reply-tokens. The same conversation (same ids, same
greedy replies) runs twice: with residency (turn N computes only its new tokens) and without
(every turn recomputes its whole history, the `disabled` mode). TTFT is measured from
`generate` to the first token event. Prints a table per turn and writes bench/out/ttft_cache.json.
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
from app.engine.runtime.types import FinishEvent, SamplingParams

MODEL_NAME = "builtin-bench-random"
OUT = Path(__file__).parent / "out" / "ttft_cache.json"


async def play(bridge: AsyncLLMEngine, messages: list[list[int]], reply_tokens: int) -> list[dict]:
    """Run the conversation; per turn: TTFT, history length and the engine's counts."""
    params = SamplingParams(max_tokens=reply_tokens, temperature=0.0, ignore_eos=True)
    history: list[int] = []
    turns = []
    for n, new in enumerate(messages, start=1):
        start = time.perf_counter()
        stream = bridge.generate("conversation", history, new, params, first_turn=n == 1)
        ttft = None
        finish: FinishEvent | None = None
        async for event in stream:
            if ttft is None:
                ttft = time.perf_counter() - start
            if isinstance(event, FinishEvent):
                finish = event
        bridge.commit_turn("conversation")
        turns.append(
            {
                "turn": n,
                "prompt_tokens": finish.counts.prompt_tokens,
                "cached_tokens": finish.counts.cached_tokens,
                "computed_tokens": finish.counts.computed_tokens,
                "ttft_s": ttft,
                "reply": finish.token_ids,
            }
        )
        history = history + new + finish.token_ids
    return turns


def run_mode(loaded, messages, reply_tokens: int, residency: bool) -> list[dict]:
    engine = LLMEngine.from_loaded(
        loaded, kv_cache_mb=256, block_size=16, max_batch_tokens=4096, residency=residency
    )
    bridge = AsyncLLMEngine(engine)
    bridge.start()
    try:
        return asyncio.run(play(bridge, messages, reply_tokens))
    finally:
        bridge.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=2000, help="tokens of the first message")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--user-tokens", type=int, default=16)
    parser.add_argument("--reply-tokens", type=int, default=16)
    args = parser.parse_args()

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    loaded = resolve_model(MODEL_NAME, device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    vocab = 256  # byte ids: plain text for the built-in byte tokenizer
    messages = [torch.randint(0, vocab, (args.history,), generator=gen).tolist()]
    for _ in range(args.turns - 1):
        messages.append(torch.randint(0, vocab, (args.user_tokens,), generator=gen).tolist())

    # Warm up (allocator, thread pools) on a short exchange.
    run_mode(loaded, [messages[0][:64], messages[1]], 2, residency=True)
    cached = run_mode(loaded, messages, args.reply_tokens, residency=True)
    recomputed = run_mode(loaded, messages, args.reply_tokens, residency=False)

    print(
        f"{MODEL_NAME}, float32, CPU, {torch.get_num_threads()} threads: TTFT per turn, "
        f"first message {args.history} tokens, then {args.user_tokens}-token messages"
    )
    print(
        f"{'turn':>4} {'prompt':>7} | {'cached':>7} {'computed':>8} {'ttft ms':>9} | "
        f"{'computed':>8} {'ttft ms':>9} | {'speedup':>7}"
    )
    print(f"{'':>12} | {'with residency':^26} | {'recompute (off)':^18} |")
    rows = []
    for c, r in zip(cached, recomputed, strict=True):
        if c["reply"] != r["reply"]:
            raise RuntimeError(f"turn {c['turn']}: cached and recomputed replies differ")
        speedup = r["ttft_s"] / c["ttft_s"]
        rows.append(
            {
                "turn": c["turn"],
                "prompt_tokens": c["prompt_tokens"],
                "cache_cached_tokens": c["cached_tokens"],
                "cache_computed_tokens": c["computed_tokens"],
                "cache_ttft_s": c["ttft_s"],
                "recompute_computed_tokens": r["computed_tokens"],
                "recompute_ttft_s": r["ttft_s"],
                "speedup": speedup,
            }
        )
        print(
            f"{c['turn']:>4} {c['prompt_tokens']:>7} | {c['cached_tokens']:>7} "
            f"{c['computed_tokens']:>8} {c['ttft_s'] * 1e3:>9.1f} | {r['computed_tokens']:>8} "
            f"{r['ttft_s'] * 1e3:>9.1f} | {speedup:>6.1f}x"
        )
    late = [row["speedup"] for row in rows if row["turn"] > 1]
    median = statistics.median(late)
    print(f"median speedup of turns 2..{args.turns}: {median:.1f}x")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "model": MODEL_NAME,
                "dtype": "float32",
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "history_tokens": args.history,
                "user_tokens": args.user_tokens,
                "reply_tokens": args.reply_tokens,
                "rows": rows,
                "median_speedup_late_turns": median,
            },
            indent=2,
        )
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
