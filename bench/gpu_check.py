"""One-shot GPU check of the paged-KV Triton kernels: correctness, then speed.

    python3 bench/gpu_check.py                  # on an H100/H200: needs only torch and triton
    python3 bench/gpu_check.py --interpret-smoke  # anywhere: one tiny case on the CPU interpreter

1. Correctness: kernels.paged_attention and kernels.store_kv against their pure-torch references
   on fresh random paged batches (decode batches of 32-256, prefill chunks on cached prefixes mixed
   with decodes, head_dim 64 and 128, grouped-query heads, split-KV), in bfloat16, and a subset in
   float16 and float32. Tolerance |out - ref| <= atol + rtol * |ref| by dtype, from the table the
   kernel tests use (kernels/testing.py, which also builds the batches). The reference runs with
   SDPA's math backend and TF32 off.
2. Speed (bf16, CUDA events, median of --reps after warmup): Triton paged attention against
   torch's F.scaled_dot_product_attention on the same keys and values already gathered into
   contiguous [B, H, S, D] tensors (the gather is not timed: SDPA gets the favourable side).
   Decode: one query per sequence; equal lengths run SDPA unmasked, ragged lengths pad to the
   longest with a key mask. Prefill: equal chunks per sequence, so SDPA runs the batch in one
   call with a bottom-right causal mask. store_kv against two index_copy_ calls.

Prints markdown tables; exits 1 if any check fails (or raises). --json PATH also writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

# Run as a script, bench/ is on sys.path and the repository root is not.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
# kernels.testing defines no kernel; the kernels are imported inside the functions, since
# TRITON_INTERPRET must be set before they are.
from kernels.testing import TOLERANCES, PagedBatch, build_paged_batch  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Check the paged-KV Triton kernels against their references and time them "
        "against torch SDPA (CUDA), or run one tiny case on the CPU interpreter."
    )
    parser.add_argument(
        "--interpret-smoke",
        action="store_true",
        help="run one tiny correctness case on the CPU under TRITON_INTERPRET=1 and exit",
    )
    parser.add_argument("--no-timing", action="store_true", help="correctness checks only")
    parser.add_argument("--reps", type=int, default=30, help="timed repetitions per case")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret_smoke:
        # Read when the kernels are defined: before kernels.* is imported.
        os.environ["TRITON_INTERPRET"] = "1"
    if args.interpret_smoke:
        device = torch.device("cpu")
        checks = run_checks(smoke_cases(), device)
        timings: list[dict] = []
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU, or pass --interpret-smoke", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  ", end="")
        import triton

        print(f"triton {triton.__version__}\n")
        checks = run_checks(gpu_cases(), device)
        timings = [] if args.no_timing else run_timings(device, args.reps)

    print_table("Correctness (ratio = worst |err| / (atol + rtol |ref|), must be <= 1)", checks)
    if timings:
        print_table("Speed, bf16 (median us)", timings)
    if args.json:
        args.json.write_text(json.dumps({"checks": checks, "timings": timings}, indent=2))
    failed = [c for c in checks if c["ok"] != "yes"] + [t for t in timings if "ok" in t]
    if failed:
        print(f"FAILED: {len(failed)} checks or timings (see above)", file=sys.stderr)
        return 1
    print(f"all {len(checks)} checks passed")
    return 0


# --- correctness ------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    prefix_lens: list[int]
    q_lens: list[int]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtypes: tuple[str, ...]
    num_kv_splits: int | None = None  # None: the launcher's choice


def _randints(low: int, high: int, count: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (count,), generator=gen).tolist()


def gpu_cases() -> list[Case]:
    all_dtypes = ("bfloat16", "float16", "float32")
    chunks, chunk_prefixes = [300, 517, 64, 1000], [0, 1500, 3000, 17]
    decodes = _randints(1, 2048, 28, seed=4)
    # fmt: off
    return [
        Case("decode B=32 GQA 32/8", _randints(0, 2048, 32, 1), [1] * 32, 32, 8, 128, 16, all_dtypes),
        Case("decode B=256 GQA 32/8", _randints(0, 1024, 256, 2), [1] * 256, 32, 8, 128, 16, ("bfloat16",)),
        Case("decode B=64 MHA 16/16 D64 bs32", _randints(0, 3000, 64, 3), [1] * 64, 16, 16, 64, 32, ("bfloat16",)),
        Case("decode B=4 ctx 8k (split-KV)", [8191, 8000, 5000, 1], [1] * 4, 32, 8, 128, 16, ("bfloat16", "float16")),
        Case("4 chunks + 28 decodes GQA 28/4", chunk_prefixes + decodes, chunks + [1] * 28, 28, 4, 128, 16, all_dtypes),
        Case("4 chunks + 28 decodes GQA 8/1 D64 bs32", chunk_prefixes + decodes, chunks + [1] * 28, 8, 1, 64, 32, ("bfloat16",)),
        Case("4 chunks + 28 decodes, 4 forced splits", chunk_prefixes + decodes, chunks + [1] * 28, 32, 8, 128, 16, ("bfloat16",), 4),
        Case("first prefill 1..2048 tokens", [0] * 4, [1, 17, 700, 2048], 32, 8, 128, 16, ("bfloat16",)),
    ]
    # fmt: on


def smoke_cases() -> list[Case]:
    return [
        Case("smoke: mixed", [0, 16, 5], [1, 1, 20], 4, 2, 32, 16, ("float32", "float16")),
        Case("smoke: mixed, 2 splits", [0, 16, 70], [3, 1, 20], 4, 2, 32, 16, ("float32",), 2),
    ]


def run_checks(cases: list[Case], device: torch.device) -> list[dict]:
    rows = []
    for case in cases:
        for dtype_name in case.dtypes:
            label = {"kernel": "paged_attention", "case": case.name, "dtype": dtype_name}
            check = partial(_check_attention, case, dtype_name, device, seed=len(rows))
            rows.append(_guarded(label, check))
    for dtype_name in ("bfloat16", "float32") if device.type == "cuda" else ("float32",):
        torch.manual_seed(len(rows))
        label = {"kernel": "store_kv", "case": "padded tokens", "dtype": dtype_name}
        rows.append(_guarded(label, partial(_check_store_kv, dtype_name, device)))
    return rows


def _guarded(label: dict, check: Callable[[], dict]) -> dict:
    """One check's row; an exception fails the check instead of ending the run."""
    try:
        return label | check()
    except Exception as exc:  # the report must go on to the other cases
        traceback.print_exc()
        return label | {"ratio": "-", "ok": f"error: {type(exc).__name__}"}


def _check_attention(case: Case, dtype_name: str, device: torch.device, seed: int) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.paged_attention import paged_attention
    from kernels.paged_attention_ref import paged_attention_ref

    dtype = getattr(torch, dtype_name)
    batch = build_paged_batch(
        list(zip(case.prefix_lens, case.q_lens, strict=True)),
        case.num_heads,
        case.num_kv_heads,
        case.head_dim,
        case.block_size,
        dtype,
        seed=seed,
        device=device,
    )
    out = paged_attention(
        *batch.attention_args(), **batch.max_seqlens(), num_kv_splits=case.num_kv_splits
    )
    with sdpa_kernel(SDPBackend.MATH):
        ref = paged_attention_ref(*batch.attention_args())
    return _compare(out, ref, **TOLERANCES[dtype])


def _check_store_kv(dtype_name: str, device: torch.device) -> dict:
    from kernels.store_kv import store_kv
    from kernels.store_kv_ref import store_kv_ref

    dtype = getattr(torch, dtype_name)
    num_tokens, num_blocks, block_size, num_kv_heads, head_dim = 300, 40, 16, 8, 128
    fused = torch.randn(num_tokens, 48, head_dim, device=device).to(dtype)  # like a qkv output
    key, value = fused[:, 32:40], fused[:, 40:48]
    pool = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[::7] = -1
    expected = pool.clone()
    store_kv_ref(key, value, expected[0], expected[1], slots)
    store_kv(key, value, pool[0], pool[1], slots)
    same = torch.equal(pool, expected)
    return {"ratio": 0.0 if same else float("inf"), "ok": "yes" if same else "no"}


def _compare(out, ref, atol: float, rtol: float) -> dict:
    err = (out.float() - ref.float()).abs()
    ratio = (err / (atol + rtol * ref.float().abs())).max().item()
    ok = ratio <= 1.0  # NaN compares False
    return {"ratio": round(ratio, 4), "ok": "yes" if ok else "no"}


# --- speed ------------------------------------------------------------------------------------


def time_us(fn: Callable[[], object], reps: int, warmup: int = 5) -> float:
    """Median of `reps` CUDA-event timings of fn, in microseconds."""
    for _ in range(warmup):
        fn()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(reps)
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return 1000.0 * statistics.median(s.elapsed_time(e) for s, e in events)


def gathered(batch: PagedBatch, pad_to: int | None = None):
    """Each sequence's keys and values as contiguous [B, Hkv, S, D] tensors (padded with 0)."""
    from kernels.paged_attention_ref import gather_kv

    lens = batch.seq_lens.tolist()
    length = pad_to or max(lens)
    num_seqs = len(lens)
    k = batch.k_cache.new_zeros(num_seqs, length, *batch.k_cache.shape[2:])
    v = torch.zeros_like(k)
    for b, n in enumerate(lens):
        k[b, :n] = gather_kv(batch.k_cache, batch.block_tables[b], n)
        v[b, :n] = gather_kv(batch.v_cache, batch.block_tables[b], n)
    return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()


def fastest_sdpa(q, k, v, reps: int, **kwargs) -> tuple[float, str]:
    """SDPA's best time over grouped-query heads: native (enable_gqa, where this torch and the
    mask allow it) or K/V repeated per query head beforehand (not timed). (us, which one)."""
    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    variants = {
        "enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs),
        "K/V repeated": lambda: F.scaled_dot_product_attention(q, k_rep, v_rep, **kwargs),
    }
    timed = {}
    for name, fn in variants.items():
        try:
            timed[name] = time_us(fn, reps)
        except (TypeError, RuntimeError) as exc:
            print(f"SDPA {name} unavailable here: {exc}", file=sys.stderr)
    best = min(timed, key=timed.get)
    return timed[best], best


def run_timings(device: torch.device, reps: int) -> list[dict]:
    rows = []
    heads = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16}
    decode_cases = [
        ("decode B=32 ctx=4096", [4095] * 32),
        ("decode B=128 ctx=2048", [2047] * 128),
        ("decode B=256 ctx=1024", [1023] * 256),
        ("decode B=4 ctx=8192", [8191] * 4),
        ("decode B=64 ctx 64..4096 ragged", _randints(63, 4096, 64, seed=5)),
    ]
    for name, prefixes in decode_cases:
        rows.append(_guarded({"case": name}, partial(_time_decode, prefixes, heads, device, reps)))
    prefill_cases = [
        ("prefill B=4 x 2048, no prefix", 0, 2048, 4),
        ("chunk B=4 x 512 on 2048 cached", 2048, 512, 4),
        ("chunk B=16 x 128 on 4096 cached", 4096, 128, 16),
    ]
    for name, prefix, chunk, num_seqs in prefill_cases:
        timing = partial(_time_prefill, prefix, chunk, num_seqs, heads, device, reps)
        rows.append(_guarded({"case": name}, timing))
    for name, num_tokens in (("store_kv T=256", 256), ("store_kv T=8192", 8192)):
        rows.append(_guarded({"case": name}, partial(_time_store_kv, num_tokens, device, reps)))
    torch.cuda.synchronize()
    return rows


def _time_decode(prefixes: list[int], heads: dict, device: torch.device, reps: int) -> dict:
    from kernels.paged_attention import paged_attention

    seqs = [(prefix, 1) for prefix in prefixes]
    batch = build_paged_batch(seqs, dtype=torch.bfloat16, device=device, **heads)
    triton_us = time_us(
        lambda: paged_attention(*batch.attention_args(), **batch.max_seqlens()), reps
    )
    k, v = gathered(batch)
    q = batch.q.unsqueeze(2)  # [B, Hq, 1, D]
    lens = batch.seq_lens.long()
    mask = None
    if min(lens.tolist()) != max(lens.tolist()):
        mask = (torch.arange(k.shape[2], device=device) < lens[:, None])[:, None, None, :]
    sdpa_us, how = fastest_sdpa(q, k, v, reps, attn_mask=mask, scale=batch.scale)
    kv_bytes = 2 * int(lens.sum()) * k.shape[1] * k.shape[3] * k.element_size()
    note = f"SDPA {how}" + (", padded + key mask" if mask is not None else "")
    return _speed_row(triton_us, sdpa_us, kv_bytes, note)


def _time_prefill(
    prefix: int, chunk: int, num_seqs: int, heads: dict, device: torch.device, reps: int
) -> dict:
    from kernels.paged_attention import paged_attention

    seqs = [(prefix, chunk)] * num_seqs
    batch = build_paged_batch(seqs, dtype=torch.bfloat16, device=device, **heads)
    triton_us = time_us(
        lambda: paged_attention(*batch.attention_args(), **batch.max_seqlens()), reps
    )
    k, v = gathered(batch)
    q = batch.q.view(num_seqs, chunk, *batch.q.shape[1:]).transpose(1, 2).contiguous()
    if prefix == 0:
        sdpa_us, how = fastest_sdpa(q, k, v, reps, is_causal=True, scale=batch.scale)
    else:
        try:
            from torch.nn.attention.bias import causal_lower_right

            mask, how_mask = causal_lower_right(chunk, prefix + chunk), "causal_lower_right"
        except ImportError:
            kpos = torch.arange(prefix + chunk, device=device)
            mask = kpos[None, :] <= (prefix + torch.arange(chunk, device=device))[:, None]
            how_mask = "bool causal mask"
        sdpa_us, how = fastest_sdpa(q, k, v, reps, attn_mask=mask, scale=batch.scale)
        how = f"{how}, {how_mask}"
    return _speed_row(triton_us, sdpa_us, None, f"SDPA {how}")


def _time_store_kv(num_tokens: int, device: torch.device, reps: int) -> dict:
    from kernels.store_kv import store_kv

    num_kv_heads, head_dim, block_size = 8, 128, 16
    num_blocks = 2 * num_tokens // block_size + 1
    key = torch.randn(num_tokens, num_kv_heads, head_dim, device=device, dtype=torch.bfloat16)
    value = torch.randn_like(key)
    pool = torch.zeros(
        2, num_blocks, block_size, num_kv_heads, head_dim, device=device, dtype=key.dtype
    )
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    triton_us = time_us(lambda: store_kv(key, value, pool[0], pool[1], slots), reps)
    flat_k = pool[0].view(-1, num_kv_heads, head_dim)
    flat_v = pool[1].view(-1, num_kv_heads, head_dim)

    def index_copy():
        flat_k.index_copy_(0, slots, key)
        flat_v.index_copy_(0, slots, value)

    torch_us = time_us(index_copy, reps)
    moved = 2 * 2 * key.numel() * key.element_size()  # read + write, keys and values
    return _speed_row(triton_us, torch_us, moved, "vs 2x index_copy_")


def _speed_row(triton_us: float, torch_us: float, num_bytes: int | None, note: str) -> dict:
    return {
        "triton_us": round(triton_us, 1),
        "torch_us": round(torch_us, 1),
        "torch/triton": round(torch_us / triton_us, 2),
        "triton_GB/s": round(num_bytes / triton_us / 1e3, 0) if num_bytes else "-",
        "note": note,
    }


def print_table(title: str, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    print(f"### {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    print()


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"({time.perf_counter() - started:.0f} s)")
    sys.exit(code)
