"""Prefill and decode throughput of the engine versus transformers, on the same weights.

    .venv/bin/python -m bench.engine_throughput [--prompt-len 256] [--new-tokens 64] [--batch 1 8]

The model is the benchmark-size built-in (`builtin-bench-random`: hidden 768, 12 layers, 12 heads,
4 KV heads, 83M parameters); transformers' LlamaForCausalLM gets its state dict. Per batch size,
both sides run the same random prompts (all of one length, so transformers needs no padding):

    prefill tokens/s = batch * prompt_len / time to the first token of every sequence
    decode tokens/s  = batch / time of one decode step (the median step of all repeats)

Transformers' times come from one `generate` call whose streamer notes when each step's tokens
arrive. The machine is shared and noisy, so runs alternate between the two, prefill takes the
best of --repeats runs and decode the median step over all of them (robust to bursts of load). Prints a table
and writes bench/out/engine_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from app.engine.loading.loader import resolve_model
from app.engine.network.model import CausalLM
from app.engine.runtime.llm_engine import LLMEngine
from app.engine.runtime.types import FinishEvent, SamplingParams
from devtools.transformers_twin import transformers_twin

MODEL_NAME = "builtin-bench-random"
OUT = Path(__file__).parent / "out" / "engine_throughput.json"


class FirstTokenClock:
    """A generate() streamer that notes when the first new tokens arrive: generate hands it
    the prompt first, then each step's tokens."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def put(self, value) -> None:
        self.calls.append(time.perf_counter())

    def end(self) -> None:
        pass


def time_hf(hf, prompts: torch.Tensor, new_tokens: int) -> tuple[float, list[float]]:
    """(prefill seconds, seconds of each decode step) of one batched greedy generate."""
    clock = FirstTokenClock()
    with torch.inference_mode():
        start = time.perf_counter()
        out = hf.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=None,
            pad_token_id=0,
            streamer=clock,
        )
    assert out.shape[1] == prompts.shape[1] + new_tokens
    assert len(clock.calls) == new_tokens + 1  # the prompt, then one call per new token
    steps = [b - a for a, b in zip(clock.calls[1:], clock.calls[2:], strict=False)]
    return clock.calls[1] - start, steps


def time_engine(
    model: CausalLM, prompts: torch.Tensor, new_tokens: int
) -> tuple[float, list[float]]:
    """(prefill seconds, seconds of each decode step): one step prefills the whole batch."""
    batch, prompt_len = prompts.shape
    engine = LLMEngine(
        model,
        kv_cache_mb=256,
        block_size=16,
        max_batch_tokens=batch * prompt_len,
        max_num_seqs=batch,
        residency=False,
    )
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    for i, row in enumerate(prompts.tolist()):
        engine.add_request(f"t{i}", [], row, params, first_turn=True)
    start = time.perf_counter()
    outputs = engine.step()
    prefill = time.perf_counter() - start
    assert len(outputs) == batch, "the whole batch must prefill in one step"
    finished = 0
    steps = []
    while engine.has_unfinished():
        start = time.perf_counter()
        outputs = engine.step()
        steps.append(time.perf_counter() - start)
        finished += sum(any(isinstance(e, FinishEvent) for e in out.events) for out in outputs)
    assert finished == batch and len(steps) == new_tokens - 1
    return prefill, steps


def summarise(runs: list[tuple[float, list[float]]]) -> tuple[float, float]:
    """(best prefill seconds, median decode step seconds over every run)."""
    return min(r[0] for r in runs), statistics.median(t for r in runs for t in r[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    loaded = resolve_model(MODEL_NAME, device="cpu", dtype=torch.float32)
    model = loaded.model
    hf = transformers_twin(model)
    num_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)

    rows = []
    for batch in args.batch:
        prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len), generator=gen)
        # Warm up both (allocator, thread pools), then take the best of the repeats.
        time_engine(model, prompts[:, :32], 4)
        time_hf(hf, prompts[:, :32], 4)
        engine_runs, hf_runs = [], []
        for _ in range(args.repeats):
            engine_runs.append(time_engine(model, prompts, args.new_tokens))
            hf_runs.append(time_hf(hf, prompts, args.new_tokens))
        (e_pre, e_step), (h_pre, h_step) = summarise(engine_runs), summarise(hf_runs)
        prefill_tokens = batch * args.prompt_len
        rows.append(
            {
                "batch": batch,
                "engine_prefill_tok_s": prefill_tokens / e_pre,
                "hf_prefill_tok_s": prefill_tokens / h_pre,
                "engine_decode_tok_s": batch / e_step,
                "hf_decode_tok_s": batch / h_step,
                "engine_decode_step_ms": e_step * 1e3,
                "hf_decode_step_ms": h_step * 1e3,
            }
        )

    print(
        f"{MODEL_NAME} ({num_params / 1e6:.0f}M params, float32, CPU, "
        f"{torch.get_num_threads()} threads); prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, {args.repeats} alternating runs each"
    )
    header = (
        f"{'batch':>5} | {'prefill tok/s':>26} | {'decode tok/s':>26}\n"
        f"{'':>5} | {'engine':>8} {'hf':>8} {'ratio':>8} | {'engine':>8} {'hf':>8} {'ratio':>8}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['batch']:>5} | {r['engine_prefill_tok_s']:>8.0f} {r['hf_prefill_tok_s']:>8.0f} "
            f"{r['engine_prefill_tok_s'] / r['hf_prefill_tok_s']:>7.2f}x | "
            f"{r['engine_decode_tok_s']:>8.1f} {r['hf_decode_tok_s']:>8.1f} "
            f"{r['engine_decode_tok_s'] / r['hf_decode_tok_s']:>7.2f}x"
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "model": MODEL_NAME,
                "num_params": num_params,
                "dtype": "float32",
                "device": "cpu",
                "threads": torch.get_num_threads(),
                "machine": platform.machine(),
                "prompt_len": args.prompt_len,
                "new_tokens": args.new_tokens,
                "repeats": args.repeats,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
