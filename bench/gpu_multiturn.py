"""The multi-turn benchmark at engine level, for a GPU machine that has torch and triton only.

    python bench/gpu_multiturn.py                      # Llama-3.2-1B shape, bf16, cuda: < 5 min
    python bench/gpu_multiturn.py --tiny --device cpu  # the same logic on a tiny model (CPU check)

It builds a Llama-3.2-1B-shaped network with random bfloat16 weights in code (hidden 2048, 16
layers, 32 heads, 8 KV heads, head_dim 64, intermediate 8192, vocab 128256, llama3 rope scaling,
tied embeddings), drives `AsyncLLMEngine` with the benchmark's workload profiles (bench/multiturn/
workloads.py; token ids instead of text, no tokenizer) in `cache` and `recompute` modes, prints
time to first token per turn for both, the fresh-token check, and decode tokens/s at
concurrency 1 and 32. No web packages: imports are torch, the engine and the standard library.
Python 3.11 or newer (the engine uses enum.StrEnum), as the project's pyproject says.

Each engine's KV pool is freed before the next one is built: the sender holding the engine is
dropped with it, then `free_memory()` collects and empties the CUDA cache.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if sys.version_info < (3, 11):  # noqa: UP036 - a GPU box may run 3.10: say so before StrEnum fails
    sys.exit("bench/gpu_multiturn.py needs Python 3.11 or newer (the engine uses enum.StrEnum)")

# Run as a script from anywhere: the repository root holds `app` and `bench` (nothing installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from app.engine.network.kv_pool import bytes_per_block  # noqa: E402
from app.engine.network.model import CausalLM, ModelConfig  # noqa: E402
from app.engine.runtime.async_engine import AsyncLLMEngine  # noqa: E402
from app.engine.runtime.llm_engine import LLMEngine  # noqa: E402
from app.engine.runtime.types import FinishEvent, SamplingParams, TokenEvent  # noqa: E402
from bench.multiturn import sizing  # noqa: E402
from bench.multiturn.driver import play  # noqa: E402
from bench.multiturn.records import MODES, RunResult, TurnRecord  # noqa: E402
from bench.multiturn.report import format_profile, format_summary, summarize  # noqa: E402
from bench.multiturn.workloads import PROFILES, Conversation, build_workload, user_ids  # noqa: E402

LLAMA_3_2_1B = ModelConfig(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_layers=16,
    num_heads=32,
    num_kv_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=True,
)
# The same architecture, small enough to check the script's logic on a CPU in seconds.
TINY = ModelConfig(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    max_position_embeddings=16384,
    rope_scaling=LLAMA_3_2_1B.rope_scaling,
    tie_word_embeddings=True,
)
GPU_CONCURRENCY = {"chat": 8, "long": 4, "agent": 8, "pressure": 4}
DECODE_CONCURRENCY = (1, 32)
RESIDENT_POOL_MARGIN = 2  # the resident pool's size over the largest workload's live history


def build_random_model(config: ModelConfig, device: str, dtype: torch.dtype) -> CausalLM:
    """The network with N(0, 0.02) weights drawn on the device (seeded), norms at one."""
    with torch.device("meta"):
        model = CausalLM(config)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    model.to(dtype=dtype)
    model.tie_weights()
    model.init_rope(device, dtype)
    model.eval()
    model.requires_grad_(False)
    return model


@dataclass
class EngineSender:
    """A TurnSender on the engine in process: token ids in, the engine's own counts out."""

    engine: AsyncLLMEngine
    vocab_size: int
    first_id: int = 0  # draw message ids from [first_id, vocab_size)

    def __post_init__(self) -> None:
        self.logs: dict[str, list[int]] = {}

    async def create_thread(self, conversation: Conversation) -> str:
        key = f"conversation-{conversation.index}"
        self.logs[key] = []
        return key

    async def send_turn(self, thread_id: str, conversation: Conversation, turn: int) -> TurnRecord:
        spec = conversation.turns[turn - 1]
        record = TurnRecord.for_turn(conversation, turn, thread_id)
        history = self.logs[thread_id]
        new_ids = user_ids(conversation, turn, self.first_id, self.vocab_size)
        params = SamplingParams(
            max_tokens=spec.max_tokens,
            temperature=1.0,
            seed=conversation.sampling_seed(turn),
            ignore_eos=True,
        )
        sent = time.perf_counter()
        stream = self.engine.generate(thread_id, history, new_ids, params, first_turn=turn == 1)
        finish = None
        async for event in stream:
            if isinstance(event, TokenEvent) and record.ttft_s is None:
                record.ttft_s = time.perf_counter() - sent
            if isinstance(event, FinishEvent):
                finish = event
        record.total_s = time.perf_counter() - sent
        if finish is None:
            raise RuntimeError("the stream ended without a FinishEvent")
        self.engine.commit_turn(thread_id)
        history.extend(new_ids)
        history.extend(finish.token_ids)
        counts = finish.counts
        record.input_tokens = counts.prompt_tokens
        record.cached_tokens = counts.cached_tokens
        record.fresh_tokens = counts.computed_tokens
        record.output_tokens = counts.generated_tokens
        record.cache_hit = counts.miss_reason is None
        record.miss_reason = counts.miss_reason.value if counts.miss_reason else None
        record.finish_reason = finish.finish_reason
        record.server = dict(finish.timings)
        return record


def make_engine(model: CausalLM, *, residency: bool, kv_cache_mb: float, args) -> AsyncLLMEngine:
    engine = AsyncLLMEngine(
        LLMEngine(
            model,
            kv_cache_mb=kv_cache_mb,
            block_size=16,
            max_batch_tokens=args.max_batch_tokens,
            max_num_seqs=args.max_num_seqs,
            residency=residency,
        )
    )
    engine.start()
    return engine


def free_memory() -> None:
    """Give a finished engine's KV pool back before the next one allocates its own."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_profile(model: CausalLM, name: str, args, per_token: int) -> tuple[RunResult, RunResult]:
    workload = build_workload(name, args.seed, scale=args.scale, reply_scale=args.reply_scale)
    concurrency = args.concurrency or GPU_CONCURRENCY[name]
    if name == "pressure":
        tokens = sizing.pressure_pool_tokens(workload, concurrency, 0.5)
    else:
        tokens = sizing.live_tokens(workload) * RESIDENT_POOL_MARGIN
    kv_mb = tokens * per_token / 2**20
    runs = {}
    for mode in MODES:
        engine = make_engine(model, residency=mode == "cache", kv_cache_mb=kv_mb, args=args)
        try:
            sender = EngineSender(engine, model.config.vocab_size)
            settings = {"kv_cache_mb": round(kv_mb, 1), "residency": mode == "cache"}
            runs[mode] = asyncio.run(
                play(workload, sender, mode=mode, concurrency=concurrency, settings=settings)
            )
            stats = engine.stats()
            runs[mode].settings["evictions"] = stats.evictions
            runs[mode].settings["preemptions"] = stats.preemptions
        finally:
            engine.shutdown()
            sender = None  # it holds the engine, and so the pool
        del engine, sender
        free_memory()
        print(f"  {name} / {mode}: {runs[mode].wall_s:.1f} s", flush=True)
    return runs["cache"], runs["recompute"]


def decode_throughput(model: CausalLM, concurrency: int, args) -> float:
    """Generated tokens per second (after every first token) for `concurrency` sequences decoding
    `args.decode_tokens` tokens each from 128-token prompts, on the synchronous engine."""
    prompt = 128
    per_seq = prompt + args.decode_tokens
    per_token = bytes_per_block(model.config, 1, next(model.parameters()).dtype)
    engine = LLMEngine(
        model,
        kv_cache_mb=concurrency * per_seq * per_token * 1.5 / 2**20 + 1,
        max_batch_tokens=max(args.max_batch_tokens, concurrency * prompt),
        max_num_seqs=max(concurrency, 1),
    )
    vocab = model.config.vocab_size
    params = SamplingParams(max_tokens=args.decode_tokens, temperature=1.0, seed=1, ignore_eos=True)
    for i in range(concurrency):
        ids = [(i * 7919 + j * 104729) % vocab for j in range(prompt)]
        engine.add_request(f"decode-{i}", [], ids, params, first_turn=True)
    started = None
    generated = 0
    while engine.has_unfinished():
        outputs = engine.step()
        if started is None:  # the prefill step ends: time the decode steps only
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            continue
        generated += sum(1 for out in outputs for e in out.events if isinstance(e, TokenEvent))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    del engine
    free_memory()
    return generated / elapsed if elapsed > 0 else math.nan


def warm_up(model: CausalLM, args) -> None:
    """One short turn, a prefill chunk and a few decode steps, before anything is timed: the
    first launches compile the Triton kernels and initialise cuBLAS."""
    engine = LLMEngine(
        model, kv_cache_mb=64, max_batch_tokens=args.max_batch_tokens, max_num_seqs=4
    )
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=0, ignore_eos=True)
    engine.add_request("warm-up", [], list(range(1, 200)), params, first_turn=True)
    while engine.has_unfinished():
        engine.step()
    engine.commit_turn("warm-up")
    engine.add_request("warm-up", list(range(1, 204)), [5, 6, 7], params, first_turn=False)
    while engine.has_unfinished():
        engine.step()
    del engine
    free_memory()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny model of the same architecture (check the logic on a CPU)",
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=("bfloat16", "float32"),
        help="default: bfloat16 on cuda, float32 on cpu",
    )
    parser.add_argument("--profiles", default=",".join(PROFILES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply conversations")
    parser.add_argument("--reply-scale", type=float, default=1.0, help="multiply reply lengths")
    parser.add_argument(
        "--concurrency", type=int, default=None, help=f"every profile (default {GPU_CONCURRENCY})"
    )
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument(
        "--decode-tokens",
        type=int,
        default=128,
        help="tokens each sequence decodes in the throughput test",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("bench/out"), help="folder for the JSON with every turn"
    )
    args = parser.parse_args(argv)
    args.profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    unknown = [p for p in args.profiles if p not in PROFILES]
    if unknown:
        parser.error(f"unknown profile(s) {unknown}; choose from {list(PROFILES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here: use --device cpu (with --tiny to keep it short)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    config = TINY if args.tiny else LLAMA_3_2_1B
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    device_name = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    model = build_random_model(config, args.device, dtype)
    num_params = sum(p.numel() for p in model.parameters())
    per_token = bytes_per_block(config, 1, dtype)
    print(
        f"model: {'tiny' if args.tiny else 'Llama-3.2-1B shape'}, {num_params / 1e9:.2f}B params, "
        f"{dtype_name}, random weights; device: {device_name}; torch {torch.__version__}",
        flush=True,
    )
    warm_up(model, args)
    try:
        pairs = [run_profile(model, name, args, per_token) for name in args.profiles]
    except ValueError as exc:  # a workload the pool sizing refuses (pressure that cannot evict)
        print(f"gpu_multiturn: {exc}", file=sys.stderr)
        return 2
    for pair in pairs:
        print("\n" + format_profile(*pair))
    decode = {c: decode_throughput(model, c, args) for c in DECODE_CONCURRENCY}
    print("\n" + format_summary(pairs) + "\n")
    for concurrency, rate in decode.items():
        print(
            f"decode: {rate:,.0f} tokens/s at concurrency {concurrency} "
            f"({rate / concurrency:,.1f} per sequence)"
        )
    elapsed = time.perf_counter() - began
    print(f"total {elapsed:.0f} s on {device_name}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu-multiturn-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    meta = {"device": device_name, "model": config.__dict__, "dtype": dtype_name,
            "args": {k: str(v) for k, v in vars(args).items()}, "decode_tokens_per_s": decode,
            "elapsed_s": elapsed}  # fmt: skip
    runs = [run.to_json() for pair in pairs for run in pair]
    path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1, default=str))
    print(f"turns: {path}")
    failed = [s for pair in pairs for s in map(summarize, pair) if s.errors or not s.fresh_check.ok]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
