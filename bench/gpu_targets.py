"""The GPU issue's targets at engine level: Llama-3.2-1B's shape, random bf16 weights.

    python3 bench/gpu_targets.py                      # on a GPU: about a minute
    python3 bench/gpu_targets.py --tiny --device cpu  # the same steps, tiny, anywhere

1. The ceiling: a device-to-device copy of 2 GiB, bytes read + written over its median time.
2. Decode at batch 1 and 32 from 1,024-token prompts, decode steps replayed as CUDA graphs and
   eager: engine step time (schedule, forward, sample, the one host sync) and the forward's
   alone, tokens/s, and at batch 1 the bytes a step must read (every weight once, each
   sequence's KV) over the step time, as a fraction of the ceiling.
3. A 64-token turn on an 8,000-token cached history: time to first token (request added ->
   the step that samples it returned), against the same turn with the history recomputed (a
   thread that sends all 8,064 tokens), median of a few distinct threads.

No web packages: torch, the engine and the standard library.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# Run as a script, bench/ is on sys.path and the repository root is not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from app.engine.network.kv_pool import bytes_per_block  # noqa: E402
from app.engine.runtime.llm_engine import LLMEngine  # noqa: E402
from app.engine.runtime.types import FinishEvent, SamplingParams, TokenEvent  # noqa: E402
from bench.gpu_check import print_table  # noqa: E402
from bench.gpu_multiturn import LLAMA_3_2_1B, TINY, build_random_model, free_memory  # noqa: E402

MAX_MODEL_LEN = 16384


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, num_bytes: int, repeats: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy (median of `repeats`)."""
    src = torch.randint(0, 255, (num_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(repeats + 2):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 2:  # two warm-ups
            times.append(time.perf_counter() - t0)
    return 2 * num_bytes / statistics.median(times)


def random_prompt(seed: int, count: int, vocab_size: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count,), generator=gen).tolist()


def engine_for(
    model,
    tokens: int,
    max_num_seqs: int,
    graphs: bool | None,
    batch_tokens: int,
    compiled: bool = False,
) -> LLMEngine:
    dtype = next(model.parameters()).dtype
    per_token = bytes_per_block(model.config, 1, dtype)
    return LLMEngine(
        model,
        kv_cache_mb=tokens * per_token * 1.25 / 2**20 + 16,
        max_batch_tokens=batch_tokens,
        max_num_seqs=max_num_seqs,
        max_model_len=MAX_MODEL_LEN,
        cuda_graphs=graphs,
        compile_decode=compiled,
    )


def decode(model, batch: int, prompt: int, steps: int, graphs: bool, compiled=False) -> dict:
    """Step and forward times of `steps` decode steps of `batch` sequences (after warm-up)."""
    device = next(model.parameters()).device
    tokens = batch * (prompt + steps + 8)
    engine = engine_for(model, tokens, batch, graphs, batch * prompt, compiled)
    forward_s = []
    run = engine.runner.run

    def timed_run(prepared):
        sync(device)
        t0 = time.perf_counter()
        out = run(prepared)
        sync(device)
        forward_s.append(time.perf_counter() - t0)
        return out

    engine.runner.run = timed_run
    params = SamplingParams(max_tokens=steps + 8, temperature=1.0, seed=1, ignore_eos=True)
    vocab = model.config.vocab_size
    for i in range(batch):
        engine.add_request(f"d{i}", [], random_prompt(i, prompt, vocab), params, first_turn=True)
    for _ in range(4):  # the prefill, then decode steps that warm the allocator
        engine.step()
    forward_s.clear()
    step_s = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        engine.step()
        step_s.append(time.perf_counter() - t0)
    context = prompt + 4 + steps // 2  # the middle step's KV length
    replayed = engine.runner.step_cache is not None
    del engine
    free_memory()
    step, forward = statistics.median(step_s), statistics.median(forward_s)
    return {"step_s": step, "forward_s": forward, "context": context, "tok_s": batch / step,
            "replayed": replayed}  # fmt: skip


def play_turn(engine: LLMEngine, key: str, history: list[int], new: list[int]):
    """One greedy token: (time from adding the turn to the step that returns it, the reply)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    sync(engine.device)
    t0 = time.perf_counter()
    engine.add_request(key, history, new, params, first_turn=not history)
    elapsed, reply = None, None
    while reply is None:
        for out in engine.step():
            for event in out.events:
                if isinstance(event, TokenEvent) and elapsed is None:
                    elapsed = time.perf_counter() - t0
                if isinstance(event, FinishEvent):
                    reply = list(event.token_ids)
    engine.commit_turn(key)
    return elapsed, reply


def cached_turn(model, history_len: int, turn_len: int, repeats: int) -> dict:
    """Per thread: the history as a first turn (kept), then a turn of `turn_len` tokens on it;
    beside it, a new thread sending history + turn at once (all of it computed)."""
    vocab = model.config.vocab_size
    tokens = 2 * (history_len + turn_len + 16) * (repeats + 1)
    engine = engine_for(model, tokens, 4, None, 8192)  # graphs where CUDA is
    cached, recomputed = [], []
    for r in range(repeats + 1):  # the first round warms up
        history = random_prompt(100 + r, history_len, vocab)
        new = random_prompt(200 + r, turn_len, vocab)
        _, reply = play_turn(engine, f"h{r}", [], history)
        log = history + reply
        t_cached, _ = play_turn(engine, f"h{r}", log, new)
        t_full, _ = play_turn(engine, f"r{r}", [], log + new)
        if r:
            cached.append(t_cached)
            recomputed.append(t_full)
    del engine
    free_memory()
    c, f = statistics.median(cached), statistics.median(recomputed)
    return {"cached_s": c, "recompute_s": f, "speedup": f / c}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model (the logic, on a CPU)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument(
        "--compile", action="store_true", help="also batch 1 with torch.compile (minutes on a GPU)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_targets: no CUDA device here (use --tiny --device cpu)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_random_model(TINY if args.tiny else LLAMA_3_2_1B, args.device, dtype)
    prompt, steps, history, turn, repeats = (
        (64, 8, 200, 16, 2) if args.tiny else (1024, 64, 8000, 64, 3)
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    ceiling = copy_bandwidth(device, 2**21 if args.tiny else 2**31)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = bytes_per_block(model.config, 1, dtype)
    print(f"device: {name}; copy bandwidth {ceiling / 1e12:.2f} TB/s (read + write)")
    print(f"model: {'tiny' if args.tiny else 'Llama-3.2-1B shape'}, {weight_bytes / 1e9:.2f} GB "
          f"of weights, {dtype}; torch {torch.__version__}", flush=True)  # fmt: skip

    rows, results = [], {"device": name, "copy_bytes_per_s": ceiling, "decode": []}
    # (batch, CUDA graphs, torch.compile): compiling costs minutes on a GPU, batch 1 only
    modes = [
        (b, g, False)
        for b in (1, 32)
        for g in ((True, False) if device.type == "cuda" else (False,))
    ]
    if args.compile:
        modes.insert(1, (1, device.type == "cuda", True))
    for batch, graphs, compiled in modes:
        r = decode(model, batch, prompt, steps, graphs, compiled)
        read = weight_bytes + batch * r["context"] * kv_per_token
        r |= {
            "batch": batch,
            "graphs": graphs,
            "compiled": compiled,
            "bytes_per_s": read / r["step_s"],
        }
        results["decode"].append(r)
        kind = "CUDA graphs" if r["replayed"] and graphs else "eager"
        share = r["bytes_per_s"] / ceiling
        rows.append(
            {
                "batch": batch,
                "decode step": ("compiled, " if compiled else "") + kind,
                "step ms": f"{r['step_s'] * 1e3:.3f}",
                "forward ms": f"{r['forward_s'] * 1e3:.3f}",
                "tokens/s": f"{r['tok_s']:.0f}",
                "bytes read / step time": f"{r['bytes_per_s'] / 1e12:.2f} TB/s "
                f"({share:.0%} of the copy)",
            }
        )
    print_table(f"Decode from {prompt}-token prompts, engine steps (median of {steps})", rows)

    t = cached_turn(model, history, turn, repeats)
    results["cached_turn"] = t
    print_table(
        f"A {turn}-token turn on a {history}-token history (median of {repeats} threads)",
        [{"history": "cached (resident KV)", "time to first token ms": f"{t['cached_s'] * 1e3:.2f}"},
         {"history": "recomputed", "time to first token ms": f"{t['recompute_s'] * 1e3:.2f}"},
         {"history": "speed-up", "time to first token ms": f"{t['speedup']:.1f}x"}],
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-targets.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
