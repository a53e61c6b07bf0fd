"""The CPU library's linears against oneDNN's, and decode steps through the fused layers against
the eager forward, side by side in one process.

    .venv/bin/python -m bench.fused_decode [--rows 1 4 8 72 300] [--batch 1 4] [--history 1500]

Part 1, linears: the 48 linears of `builtin-bench-random` (330 MB of float32 weights), each
packed both ways (kernels/cpu_linear.cpp's layout, oneDNN's blocked reorder), x of --rows rows;
ms per pass over all 48 for both, alternating, beside torch's `sum` over as many bytes (the
memory's pace: the floor of a decode step's linears). Outputs checked equal (1e-4).

Part 2, whole steps: one engine on `builtin-bench-random`, --batch threads with --history cached
tokens each, decode steps with the fused layers (network/fused_decode.py) and with the eager
forward (the same packed linears and attention kernel, one torch operation at a time), in
alternating blocks. JSON to bench/out/fused_decode.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.decode_steps import alternate_steps, decoding_engine
from kernels.cpu_library import load_cpu_library
from kernels.cpu_linear import PackedLinear

OUT = Path(__file__).parent / "out" / "fused_decode.json"
HIDDEN, INTERMEDIATE, LAYERS, QKV = 768, 2304, 12, 768 + 2 * 256


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def linears(rows_list: list[int], repeats: int) -> list[dict]:
    library = load_cpu_library()
    if library is None:
        raise SystemExit("the CPU library did not build (see the warning above)")
    gen = torch.Generator().manual_seed(0)
    shapes = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]
    weights = [torch.randn(o, i, generator=gen) * 0.02 for o, i in shapes * LAYERS]
    ours = [PackedLinear.pack(library, w) for w in weights]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in weights]
    total_bytes = sum(w.numel() * 4 for w in weights)
    flat = torch.randn(total_bytes // 4, generator=gen)
    results = []
    for rows in rows_list:
        xs = [torch.randn(rows, w.shape[1], generator=gen) for w in weights]
        for w, p, d, x in zip(weights, ours, onednn, xs, strict=True):
            want = F.linear(x, w)
            for got in (p(x), torch.ops.mkldnn._linear_pointwise(x, d, None, "none", [], "")):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

        def run_ours(xs=xs) -> None:
            for p, x in zip(ours, xs, strict=True):
                p(x)

        def run_onednn(xs=xs) -> None:
            for d, x in zip(onednn, xs, strict=True):
                torch.ops.mkldnn._linear_pointwise(x, d, None, "none", [], "")

        times: dict[str, list[float]] = {"ours": [], "onednn": [], "sum": []}
        for _ in range(3):  # alternate, so drift in the machine's speed hits both
            times["ours"].append(median_ms(run_ours, repeats))
            times["onednn"].append(median_ms(run_onednn, repeats))
            times["sum"].append(median_ms(flat.sum, repeats))
        ours_ms, onednn_ms, sum_ms = (statistics.median(times[k]) for k in times)
        results.append(
            {
                "rows": rows,
                "ours_ms": ours_ms,
                "onednn_ms": onednn_ms,
                "ratio": onednn_ms / ours_ms,
                "ours_gb_s": total_bytes / ours_ms / 1e6,
                "sum_gb_s": total_bytes / sum_ms / 1e6,
            }
        )
    return results


def whole_steps(batch: int, history: int, blocks: int, steps_per_block: int) -> dict:
    engine = decoding_engine(batch, history, max_steps=2 * blocks * (steps_per_block + 1))
    runner = engine.runner
    fused = runner.fused
    if fused is None:
        raise SystemExit("the fused decode layers do not apply here (see the warning above)")
    ms = alternate_steps(
        engine,
        {
            "fused": lambda: setattr(runner, "fused", fused),
            "eager": lambda: setattr(runner, "fused", None),
        },
        batch=batch,
        blocks=blocks,
        steps_per_block=steps_per_block,
    )
    runner.fused = fused
    return {
        "batch": batch,
        "history": history,
        "fused_step_ms": ms["fused"],
        "eager_step_ms": ms["eager"],
        "ratio": ms["eager"] / ms["fused"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 72, 300])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--history", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads; ms per pass over the 48 linears (330 MB)")
    print("| rows | library ms | oneDNN ms | oneDNN / library | library GB/s | sum GB/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    linear_results = linears(args.rows, args.repeats)
    for r in linear_results:
        print(
            f"| {r['rows']} | {r['ours_ms']:.2f} | {r['onednn_ms']:.2f} | {r['ratio']:.2f}x | "
            f"{r['ours_gb_s']:.1f} | {r['sum_gb_s']:.1f} |"
        )
    print(f"\ndecode steps, {args.history} cached tokens per thread")
    print("| batch | fused ms | eager ms | eager / fused |")
    print("|---:|---:|---:|---:|")
    step_results = []
    for batch in args.batch:
        r = whole_steps(batch, args.history, blocks=4, steps_per_block=8)
        step_results.append(r)
        print(
            f"| {batch} | {r['fused_step_ms']:.2f} | {r['eager_step_ms']:.2f} | {r['ratio']:.2f}x |"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"linears": linear_results, "steps": step_results}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
