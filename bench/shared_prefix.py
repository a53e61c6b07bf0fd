"""Shared KV blocks: pool use and TTFT with sharing versus without, and the cost of a fork.

    .venv/bin/python -m bench.shared_prefix [--threads 16] [--system 1000] [--history 2000]

Through the AsyncLLMEngine, as the service drives it, on the benchmark-size built-in model:

1. --threads threads open with the same --system-token system prompt and a short message of
   their own, one after the other, twice: with sharing (one scope for all, as one account's
   threads are) and without (no scope: each thread computes and stores its own copy). Per mode:
   KV blocks in use at the end, unique versus logical KV tokens, TTFT of thread 1 and the
   median TTFT of threads 2..N.
2. A thread with a --history-token first message takes one more (cached) turn; it is then
   forked, and the fork takes its first turn. Reported: the cached turn's TTFT and total time,
   the fork's own time (engine side: block table and one partial block copied), and the
   fork's first-turn TTFT.

Prints both and writes bench/out/shared_prefix.json.

    .venv/bin/python -m bench.shared_prefix --http [--history 2000] [--repeats 5]

3. The fork through HTTP, on a `python -m app serve` instance over a throwaway Postgres
   (bench/multiturn/service.py): a thread with a --history-token first message, then --repeats
   times: a cached turn of the parent (client-side TTFT and total), POST
   /v1/threads/{id}/fork (its round trip), the fork's first turn (TTFT). Medians, side by side;
   writes bench/out/shared_prefix_http.json.
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
from bench.engine_turns import drain_timed

OUT = Path(__file__).parent / "out" / "shared_prefix.json"
OUT_HTTP = Path(__file__).parent / "out" / "shared_prefix_http.json"


def ids(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=gen).tolist()  # byte ids: plain text


async def turn(bridge, key, history, new, reply_tokens, *, scope, first_turn) -> dict:
    params = SamplingParams(max_tokens=reply_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    stream = bridge.generate(key, history, new, params, first_turn=first_turn, share_scope=scope)
    ttft, finish = await drain_timed(stream, start)
    total = time.perf_counter() - start
    bridge.commit_turn(key)
    assert finish is not None
    return {
        "ttft_s": ttft,
        "total_s": total,
        "cached_tokens": finish.counts.cached_tokens,
        "shared_tokens": finish.counts.shared_tokens,
        "computed_tokens": finish.counts.computed_tokens,
        "log": [*history, *new, *finish.token_ids],
    }


async def many_threads(bridge, args, scope) -> dict:
    system = ids(args.system, seed=1)
    turns = []
    for i in range(args.threads):
        own = ids(args.user_tokens, seed=100 + i)
        turns.append(
            await turn(
                bridge, f"t{i}", system, own, args.reply_tokens, scope=scope, first_turn=True
            )
        )
    stats = bridge.stats()
    return {
        "used_blocks": stats.num_used_blocks,
        "logical_tokens": stats.logical_tokens,
        "unique_tokens": stats.unique_tokens,
        "first_ttft_s": turns[0]["ttft_s"],
        "median_later_ttft_s": statistics.median(t["ttft_s"] for t in turns[1:]),
        "later_computed_tokens": statistics.median(t["computed_tokens"] for t in turns[1:]),
    }


async def fork_timing(bridge, args) -> dict:
    scope = "bench"
    first = await turn(
        bridge, "p", [], ids(args.history, seed=2), args.reply_tokens, scope=scope, first_turn=True
    )
    cached = await turn(
        bridge, "p", first["log"], ids(args.user_tokens, seed=3), args.reply_tokens,
        scope=scope, first_turn=False,
    )  # fmt: skip
    log = cached["log"]
    start = time.perf_counter()
    held = await bridge.fork_thread("p", "child", log)
    fork_s = time.perf_counter() - start
    child = await turn(
        bridge, "child", log, ids(args.user_tokens, seed=4), args.reply_tokens,
        scope=scope, first_turn=False,
    )  # fmt: skip
    return {
        "thread_tokens": len(log),
        "cached_turn_ttft_s": cached["ttft_s"],
        "cached_turn_total_s": cached["total_s"],
        "fork_s": fork_s,
        "fork_held_tokens": held,
        "fork_first_turn_ttft_s": child["ttft_s"],
        "fork_first_turn_cached_tokens": child["cached_tokens"],
        "fork_first_turn_computed_tokens": child["computed_tokens"],
    }


def run(args) -> dict:
    loaded = resolve_model(args.model, device="cpu", dtype=torch.float32)

    def bridge() -> AsyncLLMEngine:
        engine = LLMEngine.from_loaded(
            loaded, kv_cache_mb=args.kv_cache_mb, block_size=16, max_batch_tokens=4096
        )
        b = AsyncLLMEngine(engine)
        b.start()
        return b

    out: dict = {"model": args.model, "threads": args.threads, "system_tokens": args.system}
    for name, scope in (("warmup", "w"), ("shared", "acct"), ("private", None)):
        b = bridge()
        try:
            if name == "warmup":
                small = argparse.Namespace(**{**vars(args), "threads": 2, "system": 64})
                asyncio.run(many_threads(b, small, scope))
            else:
                out[name] = asyncio.run(many_threads(b, args, scope))
        finally:
            b.shutdown()
    b = bridge()
    try:
        out["fork"] = asyncio.run(fork_timing(b, args))
    finally:
        b.shutdown()
    return out


async def http_fork_timing(url: str, api_key: str, args) -> dict:
    """Step 3 against a running service: medians of --repeats (cached turn, fork, fork's turn)."""
    import httpx

    from bench.multiturn.client import HttpSender, ServiceError
    from bench.multiturn.workloads import Conversation, TurnSpec

    short = TurnSpec(args.user_tokens, args.reply_tokens)
    # Turn 1 builds the thread; the parent's turns are 2, 4, ..., the forks' 3, 5, ...
    conv = Conversation(0, 7, (TurnSpec(args.history, args.reply_tokens),) + (short,) * (
        2 * args.repeats
    ))  # fmt: skip
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        sender = HttpSender(client)  # seeded sampling, as bench.multiturn

        async def send(thread_id, turn):
            record = await sender.send_turn(thread_id, conv, turn)
            if record.error:
                raise ServiceError(record.error)
            return record

        parent = await sender.create_thread(conv)
        await send(parent, 1)
        rows = []
        for i in range(args.repeats):
            cached = await send(parent, 2 + 2 * i)
            tokens = len(await sender.token_log(parent))
            start = time.perf_counter()
            response = await client.post(f"/v1/threads/{parent}/fork", json={})
            fork_s = time.perf_counter() - start
            if response.status_code != 201:
                raise ServiceError(f"fork: HTTP {response.status_code} {response.text[:200]}")
            child = await send(response.json()["id"], 3 + 2 * i)
            rows.append({
                "thread_tokens": tokens,
                "cached_turn_ttft_s": cached.ttft_s,
                "cached_turn_total_s": cached.total_s,
                "cached_turn_cached_tokens": cached.cached_tokens,
                "cached_turn_fresh_tokens": cached.fresh_tokens,
                "fork_s": fork_s,
                "fork_first_turn_ttft_s": child.ttft_s,
                "fork_first_turn_total_s": child.total_s,
                "fork_first_turn_cached_tokens": child.cached_tokens,
                "fork_first_turn_fresh_tokens": child.fresh_tokens,
            })  # fmt: skip
    # TTFT is the first streamed text (bench.multiturn's client): byte tokens that do not
    # complete a character stream nothing, so it may come a few tokens late, and a reply whose
    # text decodes to nothing has none; medians are of the turns that have one.
    median = {k: statistics.median(r[k] for r in rows if r[k] is not None) for k in rows[0]}
    return {"model": args.model, "repeats": rows, "median": median}


def run_http(args) -> dict:
    """Step 3 on a service instance of its own (throwaway database unless DATABASE_URL)."""
    from bench.multiturn import service

    out_dir = OUT_HTTP.parent
    with service.database(os.environ.get("DATABASE_URL")) as database_url:
        api_key = service.prepare_database(database_url)
        instance = service.ServiceInstance(
            name="shared-prefix",
            settings={
                "KVTHREADS_MODEL": args.model,
                "KVTHREADS_KV_CACHE_MB": str(int(args.kv_cache_mb)),
                "KVTHREADS_LOG_LEVEL": "warning",
                "KVTHREADS_DISK_CACHE_DIR": str((out_dir / "kv-shared-prefix").resolve()),
            },
            database_url=database_url,
            log_path=out_dir / "shared_prefix_http.log",
        )
        with service.running([instance]):
            return asyncio.run(http_fork_timing(instance.url, api_key, args))


def print_http(out: dict) -> None:
    m = out["median"]
    print(f"{out['model']}, through HTTP, medians of {len(out['repeats'])}")
    print(f"{'':>22} {'TTFT ms':>8} {'total ms':>9} {'cached':>7} {'computed':>9}")
    print(
        f"{'cached turn (parent)':>22} {m['cached_turn_ttft_s'] * 1e3:>8.1f} "
        f"{m['cached_turn_total_s'] * 1e3:>9.1f} {m['cached_turn_cached_tokens']:>7.0f} "
        f"{m['cached_turn_fresh_tokens']:>9.0f}"
    )
    print(f"{'POST fork':>22} {'':>8} {m['fork_s'] * 1e3:>9.1f}")
    print(
        f"{'fork first turn':>22} {m['fork_first_turn_ttft_s'] * 1e3:>8.1f} "
        f"{m['fork_first_turn_total_s'] * 1e3:>9.1f} {m['fork_first_turn_cached_tokens']:>7.0f} "
        f"{m['fork_first_turn_fresh_tokens']:>9.0f}"
    )
    print(f"thread: {m['thread_tokens']:.0f} tokens at the fork (median)")
    missing = sum(r[k] is None for r in out["repeats"] for k in r)
    if missing:
        print(f"({missing} TTFTs missing: replies that streamed no text; medians of the rest)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin-bench-random")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--system", type=int, default=1000, help="system prompt tokens")
    parser.add_argument("--history", type=int, default=2000, help="forked thread's tokens")
    parser.add_argument("--user-tokens", type=int, default=16)
    parser.add_argument("--reply-tokens", type=int, default=8)
    parser.add_argument("--kv-cache-mb", type=float, default=1024)
    parser.add_argument("--http", action="store_true", help="the fork through HTTP (step 3)")
    parser.add_argument("--repeats", type=int, default=5, help="--http: fork rounds")
    args = parser.parse_args()
    if args.http:
        out = run_http(args)
        print_http(out)
        OUT_HTTP.parent.mkdir(parents=True, exist_ok=True)
        OUT_HTTP.write_text(json.dumps(out, indent=2))
        print(f"wrote {OUT_HTTP}")
        return
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    out = run(args)

    print(f"{args.model}, float32, CPU, {torch.get_num_threads()} threads")
    print(f"{args.threads} threads, one {args.system}-token system prompt, own {args.user_tokens}")
    print(f"{'':>8} {'blocks':>7} {'logical':>8} {'unique':>7} {'ttft 1 ms':>10} "
          f"{'ttft 2..N ms':>13} {'computed 2..N':>14}")  # fmt: skip
    for name in ("shared", "private"):
        r = out[name]
        print(
            f"{name:>8} {r['used_blocks']:>7} {r['logical_tokens']:>8} {r['unique_tokens']:>7} "
            f"{r['first_ttft_s'] * 1e3:>10.1f} {r['median_later_ttft_s'] * 1e3:>13.1f} "
            f"{r['later_computed_tokens']:>14}"
        )
    f = out["fork"]
    print(
        f"fork of a {f['thread_tokens']}-token thread: {f['fork_s'] * 1e3:.2f} ms "
        f"({f['fork_held_tokens']} tokens of KV held); a cached turn: TTFT "
        f"{f['cached_turn_ttft_s'] * 1e3:.1f} ms, total {f['cached_turn_total_s'] * 1e3:.1f} ms; "
        f"the fork's first turn: TTFT {f['fork_first_turn_ttft_s'] * 1e3:.1f} ms "
        f"({f['fork_first_turn_computed_tokens']} tokens computed)"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
