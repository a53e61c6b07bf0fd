"""A step of decodes attending over the thread mirror's rows on the CPU: the C++ kernel
(kernels/cpu_decode_attention.cpp) against torch's batched products (decode_attention, padded to
the longest row and masked, as the backend ran them before), and what the kernel does to a whole
engine step.

    .venv/bin/python -m bench.decode_attention [--history 200 1000 2000] [--batch 1 4]

Part 1, attention alone: the shapes of `builtin-bench-random` (12 layers, 12 query heads over 4 KV
heads of 64), float32, every core; each layer its own mirror rows (as in a forward pass, not one
layer's keys hot in cache), rows a few tokens apart in length. Per batch and history it prints ms
per 12 layers for both ways and their ratio, the kernel's rate over the bytes it must read, and
torch's `sum` over those same bytes in the same run (the memory's pace, the floor). The outputs
are checked equal (1e-5).

Part 2, whole steps: one engine on `builtin-bench-random`, four threads with --history cached
tokens, batch-4 decode steps of the eager forward (not the fused layers, bench/fused_decode.py)
with the kernel and with torch's products, alternating in blocks.
JSON to bench/out/decode_attention.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from app.engine.network.attention.cpu_backend import decode_attention, decode_key_mask
from bench.decode_steps import alternate_steps, decoding_engine
from kernels.cpu_decode_attention import DecodeRows, load_decode_attention

LAYERS, HEADS, KV_HEADS, HEAD_DIM = 12, 12, 4, 64
SCALE = HEAD_DIM**-0.5
OUT = Path(__file__).parent / "out" / "decode_attention.json"


def best_of(fn, repeats: int, rounds: int = 3) -> float:
    """ms per call: the median of `rounds` timings of `repeats` calls each."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        times.append((time.perf_counter() - start) / repeats * 1e3)
    return statistics.median(times)


def attention_alone(batch: int, history: int, repeats: int, gen: torch.Generator) -> dict:
    kernel = load_decode_attention()
    if kernel is None:
        raise SystemExit("the kernel did not build (see the warning above)")
    lens = [history + 7 * b for b in range(batch)]
    capacity = max(lens) + 256  # the mirror's headroom
    layers = [
        torch.randn(2, batch, KV_HEADS, capacity, HEAD_DIM, generator=gen) for _ in range(LAYERS)
    ]
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen)
    rows = DecodeRows(list(range(batch)), lens)
    mask = decode_key_mask(torch.tensor(lens), max(lens))

    def native() -> list[torch.Tensor]:
        return [kernel(q, layer[0], layer[1], rows, SCALE) for layer in layers]

    def products() -> list[torch.Tensor]:
        n = max(lens)
        return [
            decode_attention(q, layer[0, :, :, :n], layer[1, :, :, :n], mask, SCALE)
            for layer in layers
        ]

    def floor() -> list[torch.Tensor]:  # the same bytes, summed
        return [layer[:, :, :, : max(lens)].sum() for layer in layers]

    for a, b in zip(native(), products(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    native_ms, products_ms, floor_ms = (best_of(f, repeats) for f in (native, products, floor))
    gigabytes = sum(lens) * KV_HEADS * HEAD_DIM * 4 * 2 * LAYERS / 1e9
    return {
        "batch": batch,
        "history": history,
        "kernel_ms": native_ms,
        "products_ms": products_ms,
        "ratio": products_ms / native_ms,
        "kernel_gb_s": gigabytes / native_ms * 1e3,
        "sum_gb_s": gigabytes / floor_ms * 1e3,
    }


def whole_steps(history: int, blocks: int, steps_per_block: int) -> dict:
    engine = decoding_engine(4, history, max_steps=2 * blocks * (steps_per_block + 1))
    engine.runner.fused = None  # the eager forward both ways: only the attention differs
    backend = engine.runner.attn
    kernel = backend.decode_kernel

    def use(kernel_or_none):
        return lambda: setattr(backend, "decode_kernel", kernel_or_none)

    ms = alternate_steps(
        engine,
        {"kernel": use(kernel), "products": use(None)},
        batch=4,
        blocks=blocks,
        steps_per_block=steps_per_block,
    )
    backend.decode_kernel = kernel
    return {
        "history": history,
        "kernel_step_ms": ms["kernel"],
        "products_step_ms": ms["products"],
        "ratio": ms["products"] / ms["kernel"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, nargs="+", default=[200, 1000, 2000])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--step-history", type=int, default=1500)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} threads; ms per 12 layers")
    print("| batch | history | kernel ms | products ms | ratio | kernel GB/s | sum GB/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    alone = []
    for batch in args.batch:
        for history in args.history:
            r = attention_alone(batch, history, args.repeats, gen)
            alone.append(r)
            print(
                f"| {batch} | {history} | {r['kernel_ms']:.2f} | {r['products_ms']:.2f} | "
                f"{r['ratio']:.2f}x | {r['kernel_gb_s']:.1f} | {r['sum_gb_s']:.1f} |"
            )
    steps = whole_steps(args.step_history, blocks=4, steps_per_block=8)
    print(
        f"batch-4 decode steps, {steps['history']} cached tokens each: kernel "
        f"{steps['kernel_step_ms']:.1f} ms, products {steps['products_step_ms']:.1f} ms "
        f"({steps['ratio']:.2f}x)"
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"attention": alone, "steps": steps}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
