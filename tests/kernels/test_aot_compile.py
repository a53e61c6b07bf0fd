"""Every kernel variant the engine can choose compiles for sm_80 and sm_90, without register
spills in 16-bit and within the target's shared memory (kernels/aot.py; no GPU needed).

The variant set is the launchers' own (`paged_attention_variants`, `store_kv_variants`) for head
sizes 64/80/96/128, float32/float16/bfloat16, a GQA group of 4 (Llama-3, Mistral; the service
warms up its own model's group at start-up), a block size of 16 and up to 32 key splits (the
combine kernel's BLOCK_S 2..32). About 260 compiles: minutes on two busy cores the first time,
seconds once Triton's cache (~/.triton/cache) holds them.

KNOWN_SPILLS are today's findings, asserted exactly (a new spill fails, and so does a fixed one
left on the list): on sm_80, which has no wgmma, the 64-row prefill tile with BLOCK_D 128 holds
its accumulators in registers and spills (issue 19 follow-up: an sm_80 tiling in
`_choose_tiles`); the sm_90 split decode tile at head size 64 stores 2 words to local memory.
"""

from __future__ import annotations

import pytest
import torch

from kernels import aot

HEAD_DIMS = (64, 80, 96, 128)
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
NUM_KV_HEADS, GROUP, BLOCK_SIZE, MAX_SPLITS = 8, 4, 16, 32


def engine_jobs() -> list[aot.Job]:
    from kernels.paged_attention import paged_attention_variants
    from kernels.store_kv import store_kv_variants

    jobs: dict[aot.Job, None] = {}
    for dtype, name in DTYPES.items():
        for head_dim in HEAD_DIMS:
            attention = paged_attention_variants(
                NUM_KV_HEADS * GROUP, NUM_KV_HEADS, head_dim, dtype, BLOCK_SIZE, MAX_SPLITS
            )
            found = [v for v, _, _ in attention] + store_kv_variants(NUM_KV_HEADS, head_dim)
            for variant in found:
                for arch in aot.SHARED_MEMORY_PER_BLOCK:
                    jobs[variant, name, arch] = None
    return list(jobs)


def test_the_variant_set_holds_every_tiling_and_split() -> None:
    jobs = engine_jobs()
    attention = {(v, d) for v, d, a in jobs if v.kernel == "paged_attention" and a == 90}
    # Per head size and 16-bit dtype: decode tile, prefill tile in one or several tiles per
    # sequence, each with and without splits (6); fp32: one tile per sequence or not, x2 (4).
    assert len(attention) == len(HEAD_DIMS) * (6 + 6 + 4)
    combine = {v.constants["BLOCK_S"] for v, _, _ in jobs if v.kernel == "combine_splits"}
    assert combine == {2, 4, 8, 16, 32}


# (sm, HEAD_DIM, BLOCK_M, ONE_TILE_PER_SEQ, SPLIT_KV), for both fp16 and bf16
KNOWN_SPILLS = {
    (90, 64, 16, True, True),
    *((80, d, 64, one, split) for d in (80, 96, 128) for one, split in [(1, 0), (0, 0), (0, 1)]),
}


def _key(job: aot.Job) -> tuple[int, int, int, bool, bool]:
    c = job[0].constants
    return (job[2], c["HEAD_DIM"], c["BLOCK_M"], bool(c["ONE_TILE_PER_SEQ"]), bool(c["SPLIT_KV"]))


@pytest.mark.skipif(not aot.can_compile(), reason="Triton's NVIDIA ptxas/cuobjdump not installed")
def test_every_engine_variant_compiles_for_sm80_and_sm90_without_spills() -> None:
    jobs = engine_jobs()
    results = aot.compile_all(jobs)
    failures, spills = [], set()
    for job, (what, why) in zip(jobs, results, strict=True):
        if why is not None and why.startswith("spills") and _key(job) in KNOWN_SPILLS:
            spills.add((_key(job), job[1]))
        elif why is not None:
            failures.append(f"{what}: {why}")
    assert not failures, "\n".join(failures)
    expected = {(key, dtype) for key in KNOWN_SPILLS for dtype in ("fp16", "bf16")}
    assert spills == expected, f"no longer spilling: {sorted(expected - spills)}"
