"""Whole decode steps of one engine, two ways side by side: what bench.decode_attention and
bench.fused_decode share.

    engine = decoding_engine(batch=4, history=1500, max_steps=80)
    ms = alternate_steps(engine, {"a": use_a, "b": use_b}, batch=4, blocks=4, steps_per_block=8)

`decoding_engine` builds an engine on `builtin-bench-random` (float32, the CPU, built in its own
thread as the service builds it) and brings `batch` threads of `history` random tokens each to
the point where every step is a step of decodes. `alternate_steps` runs blocks of steps, each
block after its way's setup call, ways taking turns (the machine's speed drifts over minutes),
and returns each way's median step in ms; the first step of a block is not timed.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def decoding_engine(batch: int, history: int, max_steps: int, seed: int = 0):
    from app.engine.loading.loader import resolve_model
    from app.engine.runtime.llm_engine import LLMEngine
    from app.engine.runtime.types import SamplingParams
    from app.threads.runtime_factory import call_in_own_thread

    def build() -> LLMEngine:
        loaded = resolve_model("builtin-bench-random", device="cpu", dtype=torch.float32)
        return LLMEngine.from_loaded(loaded, kv_cache_mb=1024, max_num_seqs=8)

    engine = call_in_own_thread(build, name="bench-load")
    gen = torch.Generator().manual_seed(seed)
    params = SamplingParams(max_tokens=max_steps + 8, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(0, 256, (history,), generator=gen).tolist()
        engine.add_request(f"t{i}", [], prompt, params, first_turn=True)
    while engine.scheduler.waiting or any(
        s.num_uncomputed_tokens > 1 for s in engine.scheduler.running
    ):
        engine.step()
    return engine


def alternate_steps(
    engine,
    ways: dict[str, Callable[[], None]],
    *,
    batch: int,
    blocks: int,
    steps_per_block: int,
) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(blocks):
        for name, use in ways.items():
            use()
            engine.step()  # the first step of a block not timed
            for _ in range(steps_per_block):
                start = time.perf_counter()
                engine.step()
                times[name].append((time.perf_counter() - start) * 1e3)
                assert engine.last_num_scheduled == batch
    return {name: statistics.median(values) for name, values in times.items()}
