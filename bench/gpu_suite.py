"""`make gpu-check`: what a GPU session must prove, in one run that needs only torch and triton.

    python3 bench/gpu_suite.py                           # on an H100/H200: about 10 minutes
    python3 bench/gpu_suite.py --device cpu --interpret  # anywhere: the same steps, tiny, on the
                                                         # CPU under Triton's interpreter

1. kernels: bench/gpu_check.py, the Triton kernels against their pure-torch references in
   bfloat16, float16 and float32, then their speed against torch SDPA.
2. engine: every built-in model in float32 (TF32 off), through the Triton attention backend on
   CUDA, its decode steps eager and replayed as CUDA graphs, against the CPU engine (pure-torch
   backend) on the same weights. Both play one scripted
   conversation: several threads over several turns, with prefills chunked by the batch budget,
   decodes batched with other threads' chunks, and every later turn served from its cached
   prefix. Gates: the same greedy replies, every sampled row's logits within --atol, the same
   cache counts. Then bfloat16 on CUDA against the same float32 CPU run, reported only (bf16
   rounding may flip a greedy choice on a near-tie).
3. targets: bench/gpu_targets.py (Llama-3.2-1B shape, bf16): decode at batch 1 and 32 with and
   without CUDA graphs against the copy bandwidth, a 64-token turn on an 8,000-token cached
   history against recomputing it.
4. benchmark: bench/gpu_multiturn.py's tables (Llama-3.2-1B shape, bf16, cache vs recompute,
   decode tokens/s).

With --interpret, the CUDA side becomes the engine on the CPU with attention_backend="triton"
(the kernels run by Triton's interpreter, float32 only), on builtin-tiny-random; the benchmark
runs its --tiny CPU mode. Without CUDA and without --interpret it says so in one line and exits 2.
Exits 1 when a step fails, 0 when all pass.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Run as a script, bench/ is on sys.path and the repository root is not.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

NO_CUDA = "gpu-check: no CUDA device here (torch {}, built for CUDA {}): run it on a GPU machine"
ENGINE_MODELS = ("builtin-tiny-random", "builtin-bench-random")
INTERPRET_MODELS = ("builtin-tiny-random",)  # the interpreter is slow: the tiny model only


@dataclass(frozen=True)
class ThreadScript:
    """One thread's turns: the length of each new user message and of each greedy reply."""

    new_tokens: tuple[int, ...]
    max_tokens: tuple[int, ...]


# Four threads, three turns each. With max_batch_tokens 64 the long first messages prefill in
# chunks while the short threads decode beside them; turns 2 and 3 extend cached prefixes that
# end mid-block and on a block boundary (block size 16).
SCRIPT = (
    ThreadScript(new_tokens=(150, 12, 40), max_tokens=(8, 6, 5)),
    ThreadScript(new_tokens=(37, 3, 16), max_tokens=(10, 7, 4)),
    ThreadScript(new_tokens=(5, 60, 1), max_tokens=(12, 5, 6)),
    ThreadScript(new_tokens=(90, 7, 25), max_tokens=(6, 8, 9)),
)
# The same shape, small, for the interpreter (--interpret), with max_batch_tokens 16 and blocks
# of 4 tokens.
SMOKE_SCRIPT = (
    ThreadScript(new_tokens=(30, 5, 9), max_tokens=(4, 3, 3)),
    ThreadScript(new_tokens=(3, 16, 1), max_tokens=(5, 2, 3)),
    ThreadScript(new_tokens=(19, 2, 4), max_tokens=(3, 4, 2)),
)


@dataclass
class TurnResult:
    """One thread's turn as one engine played it."""

    token_ids: list[int]  # the greedy reply
    logits: torch.Tensor  # [len(token_ids), V] float32 on the CPU, the rows it was sampled from
    cached_tokens: int
    computed_tokens: int


def script_ids(thread: int, turn: int, count: int, vocab_size: int) -> list[int]:
    gen = torch.Generator().manual_seed(1000 * thread + turn)
    return torch.randint(0, vocab_size, (count,), generator=gen).tolist()


def converse(
    model,
    *,
    attention_backend: str | None = None,
    script: tuple[ThreadScript, ...] = SCRIPT,
    block_size: int = 16,
    max_batch_tokens: int = 64,
    cuda_graphs: bool | None = None,
) -> list[list[TurnResult]]:
    """Play `script` on a fresh engine over `model`: per turn, every thread's message at once,
    stepped until all replies finish, then committed. Returns [turn][thread]."""
    from app.engine.runtime.llm_engine import LLMEngine
    from app.engine.runtime.types import FinishEvent, SamplingParams

    rows: dict[int, list[torch.Tensor]] = {}

    def on_logits(seqs, logits: torch.Tensor) -> None:
        for seq, row in zip(seqs, logits.float().cpu(), strict=True):
            rows.setdefault(seq.seq_id, []).append(row)

    vocab_size = model.config.vocab_size
    total = sum(sum(t.new_tokens) + sum(t.max_tokens) for t in script)
    engine = LLMEngine(
        model,
        num_blocks=total // block_size + 4 * len(script),
        block_size=block_size,
        max_batch_tokens=max_batch_tokens,
        max_num_seqs=len(script),
        check_invariants=True,
        on_logits=on_logits,
        attention_backend=attention_backend,
        cuda_graphs=cuda_graphs,
    )
    logs: list[list[int]] = [[] for _ in script]
    turns = []
    for turn in range(len(script[0].new_tokens)):
        seq_ids = []
        for thread, spec in enumerate(script):
            new_ids = script_ids(thread, turn, spec.new_tokens[turn], vocab_size)
            params = SamplingParams(
                max_tokens=spec.max_tokens[turn], temperature=0.0, ignore_eos=True
            )
            seq_ids.append(
                engine.add_request(thread, logs[thread], new_ids, params, first_turn=turn == 0)
            )
            logs[thread] = [*logs[thread], *new_ids]
        finished: dict[int, FinishEvent] = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.error is not None:
                    raise out.error
                finished.update((out.seq_id, e) for e in out.events if isinstance(e, FinishEvent))
        results = []
        for thread, seq_id in enumerate(seq_ids):
            event = finished[seq_id]
            engine.commit_turn(thread)
            logs[thread].extend(event.token_ids)
            results.append(
                TurnResult(
                    token_ids=list(event.token_ids),
                    logits=torch.stack(rows[seq_id]),
                    cached_tokens=event.counts.cached_tokens,
                    computed_tokens=event.counts.computed_tokens,
                )
            )
        turns.append(results)
    return turns


@dataclass
class Comparison:
    max_abs_diff: float  # over the rows both engines sampled from the same context
    greedy_equal: bool
    counts_equal: bool
    first_divergence: str  # "" when the replies are equal; else where, and the reference's margin


def compare(got: list[list[TurnResult]], want: list[list[TurnResult]]) -> Comparison:
    """`got` against the reference `want`, turn by turn and thread by thread. After a reply
    diverges, its later rows (another context) and that thread's later turns are not compared."""
    worst, divergence, counts_equal = 0.0, "", True
    diverged: set[int] = set()
    for turn, (got_turn, want_turn) in enumerate(zip(got, want, strict=True)):
        for thread, (g, w) in enumerate(zip(got_turn, want_turn, strict=True)):
            if thread in diverged:
                continue
            counts_equal &= (g.cached_tokens, g.computed_tokens) == (
                w.cached_tokens,
                w.computed_tokens,
            )
            pairs = zip(g.token_ids, w.token_ids, strict=False)  # lengths compared below
            at = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
            if at is None and len(g.token_ids) != len(w.token_ids):
                at = min(len(g.token_ids), len(w.token_ids))
            last = len(w.token_ids) if at is None else at + 1  # rows of the same context
            worst = max(worst, (g.logits[:last] - w.logits[:last]).abs().max().item())
            if at is not None:
                diverged.add(thread)
                if not divergence:
                    top2 = w.logits[min(at, len(w.token_ids) - 1)].topk(2).values
                    margin = (top2[0] - top2[1]).item()
                    divergence = (
                        f"thread {thread} turn {turn + 1} token {at} "
                        f"(reference top-2 margin {margin:.2e})"
                    )
    return Comparison(worst, not diverged, counts_equal, divergence)


def run_kernels(args: argparse.Namespace) -> bool:
    from bench import gpu_check

    if args.interpret:
        return gpu_check.main(["--interpret-smoke"]) == 0
    return gpu_check.main(["--json", str(args.out / "gpu-check-kernels.json")]) == 0


def run_engine(args: argparse.Namespace) -> bool:
    from app.engine.loading.builtin import build_builtin_model

    models = args.models or (INTERPRET_MODELS if args.interpret else ENGINE_MODELS)
    script = SMOKE_SCRIPT if args.interpret else SCRIPT
    sizes = {"block_size": 4, "max_batch_tokens": 16} if args.interpret else {}
    rows, ok = [], True
    for name in models:
        started = time.perf_counter()
        reference_model, _ = build_builtin_model(name, "cpu", torch.float32)
        reference = converse(reference_model, script=script, **sizes)  # CPU: pure-torch attention
        del reference_model
        # (dtype, CUDA graphs for decode steps, gated)
        candidates = (
            [("float32", False, True)]
            if args.interpret
            else [("float32", False, True), ("float32", True, True), ("bfloat16", True, False)]
        )
        for dtype_name, graphs, gated in candidates:
            if args.interpret:
                model, _ = build_builtin_model(name, "cpu", torch.float32)
                got = converse(model, attention_backend="triton", script=script, **sizes)
                where = "cpu, Triton interpreted"
            else:
                model, _ = build_builtin_model(name, "cuda", getattr(torch, dtype_name))
                # CUDA's own backend: Triton; decode steps eager or replayed as CUDA graphs
                got = converse(model, script=script, cuda_graphs=graphs)
                where = "cuda, Triton, " + ("CUDA graphs" if graphs else "eager")
            del model
            result = compare(got, reference)
            passed = (
                result.greedy_equal and result.counts_equal and result.max_abs_diff <= args.atol
            )
            ok &= passed or not gated
            rows.append(
                {
                    "model": name,
                    "engine": f"{where}, {dtype_name}",
                    "max abs logits diff": f"{result.max_abs_diff:.2e}",
                    "greedy replies equal": "yes" if result.greedy_equal else "no",
                    "first divergence": result.first_divergence or "-",
                    "cache counts equal": "yes" if result.counts_equal else "no",
                    "ok": ("yes" if passed else "no") if gated else "(reported only)",
                }
            )
        print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
    from bench.gpu_check import print_table

    turns = len(script[0].new_tokens)
    print_table(
        f"Engine against the CPU engine in float32 ({len(script)} threads x {turns} turns, "
        f"chunked prefills, batched decodes, cached prefixes; gate: logits <= {args.atol:g})",
        rows,
    )
    return ok


def run_targets(args: argparse.Namespace) -> bool:
    from bench import gpu_targets

    if args.interpret:
        return gpu_targets.main(["--tiny", "--device", "cpu", "--out", str(args.out)]) == 0
    return gpu_targets.main(["--out", str(args.out)]) == 0


def run_benchmark(args: argparse.Namespace) -> bool:
    from bench import gpu_multiturn

    out = ["--out", str(args.out)]
    if args.interpret:
        tiny = ["--tiny", "--device", "cpu", "--profiles", "chat", "--scale", "0.5",
                "--reply-scale", "0.05", "--concurrency", "1", "--decode-tokens", "4"]  # fmt: skip
        return gpu_multiturn.main(tiny + out) == 0
    return gpu_multiturn.main(out) == 0


STEPS: dict[str, Callable[[argparse.Namespace], bool]] = {
    "kernels": run_kernels,
    "engine": run_engine,
    "targets": run_targets,
    "benchmark": run_benchmark,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--interpret",
        action="store_true",
        help="with --device cpu: the Triton path on the CPU under Triton's interpreter (tiny)",
    )
    parser.add_argument(
        "--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}"
    )
    parser.add_argument("--models", type=lambda s: tuple(s.split(",")), default=None)
    parser.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="float32 logits gate (invariant 3's tolerance; default 1e-4)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="JSON results")
    args = parser.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {unknown}; choose from {list(STEPS)}")
    if args.interpret != (args.device == "cpu"):
        parser.error("--device cpu goes with --interpret (the Triton path needs one or the other)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.interpret:
        # Read when the kernels are defined: before kernels/ is imported (nothing above does).
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print(NO_CUDA.format(torch.__version__, torch.version.cuda), file=sys.stderr)
        return 2
    else:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    outcome = {}
    for name in args.steps:
        print(f"\n## {name}\n", flush=True)
        started = time.perf_counter()
        try:
            outcome[name] = STEPS[name](args)
        except Exception:  # the report must go on to the other steps
            traceback.print_exc()
            outcome[name] = False
        print(f"({name}: {time.perf_counter() - started:.0f} s)", flush=True)
    print("\n## gpu-check\n")
    for name, passed in outcome.items():
        print(f"{name}: {'ok' if passed else 'FAILED'}")
    return 0 if all(outcome.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
