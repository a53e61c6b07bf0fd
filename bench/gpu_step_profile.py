"""Where an engine step's host time goes on a GPU: cProfile over cached turns and decode steps.

    python3 bench/gpu_step_profile.py [--turn 64] [--history 8000] [--top 25]

The Llama-3.2-1B shape in bf16 (random weights), CUDA graphs as configured by default. Profiles
a few 64-token turns on an 8,000-token cached history, then decode steps at batch 1, and prints
the functions with the most time of their own. The GPU's share shows as the one host sync per
step (`tolist` in the engine step).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.gpu_multiturn import LLAMA_3_2_1B, TINY, build_random_model  # noqa: E402
from bench.gpu_targets import engine_for, play_turn, random_prompt  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--history", type=int, default=8000)
    parser.add_argument("--turn", type=int, default=64)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = build_random_model(TINY if args.tiny else LLAMA_3_2_1B, args.device, dtype)
    vocab = model.config.vocab_size
    engine = engine_for(model, 4 * (args.history + 200), 4, None, 8192)
    history = random_prompt(1, args.history, vocab)
    _, reply = play_turn(engine, "t", [], history)
    log = history + reply
    for i in range(2):  # warm-up turns
        new = random_prompt(10 + i, args.turn, vocab)
        _, reply = play_turn(engine, "t", log, new)
        log += new + reply

    profile = cProfile.Profile()
    times = []
    for i in range(5):
        new = random_prompt(20 + i, args.turn, vocab)
        profile.enable()
        elapsed, reply = play_turn(engine, "t", log, new)
        profile.disable()
        times.append(elapsed)
        log += new + reply
    print(
        f"## {args.turn}-token turns on {len(log)} tokens: TTFT ms {[round(t * 1e3, 2) for t in times]}"
    )
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    pstats.Stats(profile).sort_stats("cumulative").print_stats("app/engine|kvcache", args.top)

    from app.engine.runtime.types import SamplingParams

    params = SamplingParams(max_tokens=40, temperature=1.0, seed=0, ignore_eos=True)
    engine.add_request("d", [], random_prompt(3, 1024, vocab), params, first_turn=True)
    for _ in range(4):
        engine.step()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(30):
        engine.step()
    profile.disable()
    print("## 30 decode steps at batch 1")
    pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
