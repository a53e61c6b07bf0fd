"""Every kernel variant the engine can choose compiles for sm_80 and sm_90, without register
spills in 16-bit (issue 19) and within the target's shared memory (kernels/aot.py; no GPU needed).

The variant set is the launchers' own for each target (`paged_attention_variants` with its `arch`,
`store_kv_variants`) for head
sizes 64/80/96/128, float32/float16/bfloat16, a GQA group of 4 (Llama-3, Mistral; the service
warms up its own model's group at start-up), a block size of 16 and up to 32 key splits (the
combine kernel's BLOCK_S 2..32). About 260 compiles: minutes on two busy cores the first time,
seconds once Triton's cache (~/.triton/cache) holds them.
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
            for arch in aot.SHARED_MEMORY_PER_BLOCK:
                attention = paged_attention_variants(
                    NUM_KV_HEADS * GROUP,
                    NUM_KV_HEADS,
                    head_dim,
                    dtype,
                    BLOCK_SIZE,
                    MAX_SPLITS,
                    arch=arch,
                )
                found = [v for v, _, _ in attention] + store_kv_variants(NUM_KV_HEADS, head_dim)
                for variant in found:
                    jobs[variant, name, arch] = None
    return list(jobs)


def test_the_variant_set_holds_every_tiling_and_split() -> None:
    jobs = engine_jobs()
    for arch in aot.SHARED_MEMORY_PER_BLOCK:
        attention = {(v, d) for v, d, a in jobs if v.kernel == "paged_attention" and a == arch}
        # Per head size and 16-bit dtype: decode tile, prefill tile in one or several tiles per
        # sequence, each with and without splits (6); fp32: one tile per sequence or not, x2 (4).
        assert len(attention) == len(HEAD_DIMS) * (6 + 6 + 4)
    combine = {v.constants["BLOCK_S"] for v, _, _ in jobs if v.kernel == "combine_splits"}
    assert combine == {2, 4, 8, 16, 32}


@pytest.mark.skipif(not aot.can_compile(), reason="Triton's NVIDIA ptxas/cuobjdump not installed")
def test_every_engine_variant_compiles_for_sm80_and_sm90_without_spills() -> None:
    jobs = engine_jobs()
    results = aot.compile_all(jobs)
    failures = [f"{what}: {why}" for what, why in results if why is not None]
    assert not failures, "\n".join(failures)
