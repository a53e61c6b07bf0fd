"""A turn's new tokens attending over a cached history on the CPU: SDPA over the paged pool
against row_attention over head-major rows (the thread mirror's), with the C allocator as it
comes and with freed memory kept (app/engine/network/host_memory.py).

    .venv/bin/python -m bench.row_attention [--new 65] [--history 485 1940] [--repeats 30]

The shapes of `builtin-bench-random` (12 layers, 12 query heads over 4 KV heads of 64), float32,
every core. Each layer has its own keys (as in a forward pass: not one layer's keys hot in cache).
Each allocator setting runs in a child process of its own (mallopt is process-wide and one-way);
within one, the two ways alternate. Prints ms per 12 layers, page faults per call, and the ratio;
the two ways' outputs are checked equal (1e-5).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 12, 12, 4, 64
SCALE = HEAD_DIM**-0.5


def timed(fn, repeats: int) -> tuple[float, float]:
    """(ms per call, minor page faults per call)."""
    for _ in range(3):
        fn()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    ms = (time.perf_counter() - start) / repeats * 1e3
    return ms, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats


def measure(history: int, new: int, repeats: int, gen: torch.Generator) -> dict:
    """Both ways on one history length: checked equal, then timed twice in alternation."""
    from app.engine.network.attention.row_attention import row_attention, row_attention_mask
    from kernels.paged_attention_ref import chunk_mask

    keys = history + new
    # The pool's layout [slot, Hkv, D] (a consecutive thread: one view), and the mirror's.
    pool = [torch.randn(2, keys, KV_HEADS, HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    mirror = [p.transpose(1, 2).contiguous() for p in pool]  # [2, Hkv, S, D]
    q = torch.randn(new, HEADS, HEAD_DIM, generator=gen)
    sdpa_mask = chunk_mask(new, keys, q.device)
    row_mask = row_attention_mask(new, keys, HEADS // KV_HEADS, q.device)

    def sdpa() -> list[torch.Tensor]:
        return [
            F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0),
                p[0].transpose(0, 1).unsqueeze(0),
                p[1].transpose(0, 1).unsqueeze(0),
                attn_mask=sdpa_mask,
                scale=SCALE,
                enable_gqa=True,
            )[0].transpose(0, 1)
            for p in pool
        ]

    def rows_way() -> list[torch.Tensor]:
        return [row_attention(q, m[0], m[1], SCALE, row_mask) for m in mirror]

    for a, b in zip(sdpa(), rows_way(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    sdpa_ms, sdpa_faults = timed(sdpa, repeats)
    rows_ms, rows_faults = timed(rows_way, repeats)
    sdpa_ms2, _ = timed(sdpa, repeats)
    rows_ms2, _ = timed(rows_way, repeats)
    return {
        "history": history,
        "sdpa_ms": (sdpa_ms + sdpa_ms2) / 2,
        "rows_ms": (rows_ms + rows_ms2) / 2,
        "sdpa_faults": sdpa_faults,
        "rows_faults": rows_faults,
    }


def child(keep: bool, new: int, histories: list[int], repeats: int) -> list[dict]:
    from app.engine.network.host_memory import keep_freed_memory

    if keep:
        keep_freed_memory()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    gen = torch.Generator().manual_seed(0)
    return [measure(history, new, repeats, gen) for history in histories]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new", type=int, default=65, help="the turn's new tokens")
    parser.add_argument("--history", type=int, nargs="+", default=[485, 1940])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--child", choices=("default", "kept"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        rows = child(args.child == "kept", args.new, args.history, args.repeats)
        print(json.dumps(rows))
        return

    print(
        f"{args.new} new tokens over a cached history, {LAYERS} layers of {HEADS} query heads "
        f"over {KV_HEADS} KV heads, float32, CPU; ms per {LAYERS} layers (faults per call)"
    )
    print(
        f"{'allocator':>9} {'history':>7} | {'SDPA over the pool':>20} | "
        f"{'row_attention':>20} | {'SDPA / rows':>11}"
    )
    for mode in ("default", "kept"):
        command = [sys.executable, "-m", "bench.row_attention", "--child", mode]
        command += ["--new", str(args.new), "--repeats", str(args.repeats), "--history"]
        command += [str(h) for h in args.history]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        for row in json.loads(out.strip().splitlines()[-1]):
            sdpa = f"{row['sdpa_ms']:.1f} ({row['sdpa_faults']:.0f})"
            rows = f"{row['rows_ms']:.1f} ({row['rows_faults']:.0f})"
            ratio = row["sdpa_ms"] / row["rows_ms"]
            print(f"{mode:>9} {row['history']:>7} | {sdpa:>20} | {rows:>20} | {ratio:>10.2f}x")


if __name__ == "__main__":
    main()
