"""bench/shared_prefix.py's logic at a tiny size: sharing stores the prefix once, a fork's first
turn computes only its new tokens."""

import argparse

from bench.shared_prefix import run


def test_shared_prefix_bench_at_a_tiny_size():
    args = argparse.Namespace(
        model="builtin-tiny-random", threads=4, system=100, history=200, user_tokens=8,
        reply_tokens=2, kv_cache_mb=4,
    )  # fmt: skip
    out = run(args)
    shared, private = out["shared"], out["private"]
    assert shared["logical_tokens"] == private["logical_tokens"]
    assert shared["unique_tokens"] < private["unique_tokens"] == private["logical_tokens"]
    assert shared["used_blocks"] < private["used_blocks"]
    assert shared["later_computed_tokens"] == 8  # own tokens only: the tail block is copied
    assert private["later_computed_tokens"] == 108
    fork = out["fork"]
    assert fork["fork_held_tokens"] == fork["thread_tokens"] - 1
    assert fork["fork_first_turn_computed_tokens"] == 8 + 1
