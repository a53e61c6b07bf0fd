"""kernels/testing.py: the batches the kernel tests and bench/gpu_check.py check the kernels on."""

import torch

from kernels._checks import KERNEL_DTYPES
from kernels.testing import TOLERANCES, build_paged_batch


def test_every_kernel_dtype_has_a_tolerance_fp32_the_tightest():
    assert set(TOLERANCES) == set(KERNEL_DTYPES)
    assert TOLERANCES[torch.float32] == min(TOLERANCES.values(), key=lambda t: t["atol"])


def test_owned_slots_hold_keys_and_all_others_nan():
    seqs = [(0, 1), (17, 16), (5, 0)]
    batch = build_paged_batch(seqs, 4, 2, 16, 16, torch.float16, seed=3)
    owned = torch.zeros(batch.k_cache.shape[:2], dtype=torch.bool)
    for b, length in enumerate(batch.seq_lens.tolist()):
        pos = torch.arange(length)
        owned[batch.block_tables[b, pos // 16].long(), pos % 16] = True
    for cache in (batch.k_cache, batch.v_cache):
        assert cache[owned].isfinite().all()
        assert cache[~owned].isnan().all()
    assert batch.cu_seqlens_q.tolist() == [0, 1, 17, 17]
    assert (batch.max_seqlen_q, batch.max_seqlen_k) == (16, 33)


def test_a_seed_gives_one_batch():
    first, again = (build_paged_batch([(40, 9)], 4, 2, 16, 16, torch.float32, seed=5) for _ in "ab")
    assert torch.equal(first.block_tables, again.block_tables)
    assert torch.equal(first.q, again.q)
    assert torch.equal(first.k_cache.nan_to_num(), again.k_cache.nan_to_num())
