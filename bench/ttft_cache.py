"""Time to first token of a late turn in a long conversation: resident KV, KV restored from
the host or the disk tier, and recompute.

    .venv/bin/python -m bench.ttft_cache [--history 2000] [--turns 4] [--user-tokens 16]

One conversation on the benchmark-size built-in model, through the AsyncLLMEngine as the service
drives it: turn 1 sends a document of about --history tokens, every later turn a short user
message (--user-tokens) and gets a reply of --reply-tokens. The same conversation (same ids, same
greedy replies) runs twice: with residency (turn N computes only its new tokens) and without
(every turn recomputes its whole history, the `disabled` mode). TTFT is measured from
`generate` to the first token event. Prints a table per turn and writes bench/out/ttft_cache.json.

The same conversation also runs with the thread moved down before every later turn (as memory
pressure would): to the host tier (`host`: a copy back into device blocks, then the new tokens),
and to the disk tier (`disk`, host tier off: the snapshot is written, then read back, checked and
copied in; the file sits in the page cache, as a recently evicted thread's would). The bar: a
host restore within 1.5x of a device hit, a disk restore at least 5x faster than recomputing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from app.engine.loading.loader import resolve_model
from app.engine.runtime.async_engine import AsyncLLMEngine
from app.engine.runtime.llm_engine import LLMEngine
from app.engine.runtime.types import SamplingParams
from bench.engine_turns import drain_timed

MODEL_NAME = "builtin-bench-random"
OUT = Path(__file__).parent / "out" / "ttft_cache.json"


async def play(
    bridge: AsyncLLMEngine, messages: list[list[int]], reply_tokens: int, move_down: bool = False
) -> list[dict]:
    """Run the conversation; per turn: TTFT, history length and the engine's counts. With
    move_down, the thread is evicted down a tier before every later turn (not timed)."""
    params = SamplingParams(max_tokens=reply_tokens, temperature=0.0, ignore_eos=True)
    history: list[int] = []
    turns = []
    for n, new in enumerate(messages, start=1):
        if move_down and n > 1:
            assert await bridge.move_down("conversation")
            await asyncio.to_thread(bridge.engine.flush_disk)  # the snapshot is on disk
        start = time.perf_counter()
        stream = bridge.generate("conversation", history, new, params, first_turn=n == 1)
        ttft, finish = await drain_timed(stream, start)
        bridge.commit_turn("conversation")
        turns.append(
            {
                "turn": n,
                "prompt_tokens": finish.counts.prompt_tokens,
                "cached_tokens": finish.counts.cached_tokens,
                "computed_tokens": finish.counts.computed_tokens,
                "tier": finish.counts.cache_tier,
                "ttft_s": ttft,
                "reply": finish.token_ids,
            }
        )
        history = history + new + finish.token_ids
    return turns


def run_mode(loaded, messages, reply_tokens: int, mode: str) -> list[dict]:
    """mode: device (resident KV), host, disk (moved down before each later turn), recompute."""
    tiers: dict = {}
    with tempfile.TemporaryDirectory(prefix="kvthreads-ttft-") as folder:
        if mode == "host":
            tiers = {"host_cache_mb": 512}
        elif mode == "disk":
            tiers = {"disk_cache_dir": folder, "disk_cache_mb": 1024}
        engine = LLMEngine.from_loaded(
            loaded,
            kv_cache_mb=256,
            block_size=16,
            max_batch_tokens=4096,
            residency=mode != "recompute",
            **tiers,
        )
        bridge = AsyncLLMEngine(engine)
        bridge.start()
        try:
            return asyncio.run(
                play(bridge, messages, reply_tokens, move_down=mode in ("host", "disk"))
            )
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
    run_mode(loaded, [messages[0][:64], messages[1]], 2, "device")
    cached = run_mode(loaded, messages, args.reply_tokens, "device")
    recomputed = run_mode(loaded, messages, args.reply_tokens, "recompute")
    from_host = run_mode(loaded, messages, args.reply_tokens, "host")
    from_disk = run_mode(loaded, messages, args.reply_tokens, "disk")

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

    print("\nrestored from a tier below the device (thread moved down before each later turn):")
    print(f"{'turn':>4} {'prompt':>7} | {'host cached':>11} {'ttft ms':>9} | "
          f"{'disk cached':>11} {'ttft ms':>9} | {'device ms':>9} {'recompute ms':>12}")  # fmt: skip
    tier_rows = []
    for c, r, h, d in zip(cached, recomputed, from_host, from_disk, strict=True):
        if not c["reply"] == h["reply"] == d["reply"] == r["reply"]:
            raise RuntimeError(f"turn {c['turn']}: replies differ between tiers")
        if c["turn"] > 1 and (h["tier"], d["tier"]) != ("host", "disk"):
            raise RuntimeError(f"turn {c['turn']}: served from {h['tier']} and {d['tier']}")
        tier_rows.append(
            {
                "turn": c["turn"],
                "prompt_tokens": c["prompt_tokens"],
                "host_cached_tokens": h["cached_tokens"],
                "host_ttft_s": h["ttft_s"],
                "disk_cached_tokens": d["cached_tokens"],
                "disk_ttft_s": d["ttft_s"],
            }
        )
        print(
            f"{c['turn']:>4} {c['prompt_tokens']:>7} | {h['cached_tokens']:>11} "
            f"{h['ttft_s'] * 1e3:>9.1f} | {d['cached_tokens']:>11} {d['ttft_s'] * 1e3:>9.1f} | "
            f"{c['ttft_s'] * 1e3:>9.1f} {r['ttft_s'] * 1e3:>12.1f}"
        )
    late_ttft = {
        name: statistics.median(t["ttft_s"] for t in turns if t["turn"] > 1)
        for name, turns in (
            ("device", cached), ("host", from_host), ("disk", from_disk), ("recompute", recomputed)
        )
    }  # fmt: skip
    host_ratio = late_ttft["host"] / late_ttft["device"]
    disk_speedup = late_ttft["recompute"] / late_ttft["disk"]
    print(
        f"median TTFT of turns 2..{args.turns}: device {late_ttft['device'] * 1e3:.1f} ms, "
        f"host {late_ttft['host'] * 1e3:.1f} ms, disk {late_ttft['disk'] * 1e3:.1f} ms, "
        f"recompute {late_ttft['recompute'] * 1e3:.1f} ms"
    )
    print(f"{'PASS' if host_ratio <= 1.5 else 'FAIL'}  host restore / device hit: "
          f"{host_ratio:.2f}x (bar: <= 1.5x)")  # fmt: skip
    print(f"{'PASS' if disk_speedup >= 5 else 'FAIL'}  recompute / disk restore: "
          f"{disk_speedup:.1f}x (bar: >= 5x)")  # fmt: skip
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
                "tier_rows": tier_rows,
                "median_late_ttft_s": late_ttft,
                "host_over_device": host_ratio,
                "recompute_over_disk": disk_speedup,
            },
            indent=2,
        )
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
