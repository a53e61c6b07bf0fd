"""kernels/paged_attention.py against kernels/paged_attention_ref.py under the Triton interpreter.

Each batch is built fresh by `build_paged_batch` (kernels/testing.py, shared with bench/gpu_check.py):
blocks scattered over the pool, NaN in every slot that holds no key. (prefix, q_len) pairs are
chosen around the block size. Tests that reach a tiling that differs between sm_80 and sm_90
(`_choose_tiles`: 16-bit prefill with BLOCK_D 128) run both, through the `arch` fixture.
"""

import pytest
import torch

from kernels import paged_attention as pa
from kernels.paged_attention import paged_attention
from kernels.paged_attention_ref import paged_attention_ref
from kernels.testing import TOLERANCES, PagedBatch, build_paged_batch

# A first prefill of one token, chunks on and off block boundaries, decodes at a block edge.
MIXED = [(0, 1), (0, 15), (16, 1), (17, 16), (5, 33), (0, 17), (31, 2)]
# Decode only: one token per sequence, prefixes from empty to several blocks.
DECODE = [(0, 1), (15, 1), (16, 1), (63, 1), (100, 1), (32, 1), (7, 1), (47, 1), (1, 1)]


@pytest.fixture(params=[80, 90])
def arch(request, monkeypatch) -> int:
    """The interpreter runs the tiles `paged_attention` chooses on this compute capability."""
    monkeypatch.setattr(pa, "INTERPRETER_ARCH", request.param)
    return request.param


def _run(batch: PagedBatch, **kwargs) -> torch.Tensor:
    return paged_attention(*batch.attention_args(), **batch.max_seqlens() | kwargs)


def _check(batch: PagedBatch, **kwargs) -> None:
    out = _run(batch, **kwargs)
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    torch.testing.assert_close(
        out, paged_attention_ref(*batch.attention_args()), **TOLERANCES[batch.q.dtype]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "block_size"),
    [
        (4, 2, 16, 16),
        (8, 1, 64, 32),
        (4, 4, 128, 16),
        (6, 2, 32, 32),  # a group of 3: tiles hold a ragged number of tokens
    ],
)
def test_mixed_prefill_and_decode(arch, dtype, num_heads, num_kv_heads, head_dim, block_size):
    _check(build_paged_batch(MIXED, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("num_heads", "num_kv_heads", "head_dim", "block_size"),
    [(8, 1, 64, 16), (4, 2, 128, 32), (4, 4, 32, 16)],
)
def test_decode_batch(dtype, num_heads, num_kv_heads, head_dim, block_size):
    _check(build_paged_batch(DECODE, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    ("seqs", "num_kv_splits", "head_dim"),
    [(DECODE, 3, 32), (MIXED, 2, 32), (DECODE, 8, 32), (MIXED, 3, 96)],
)
def test_split_kv_matches_one_pass(arch, dtype, seqs, num_kv_splits, head_dim):
    # Splits of 64 keys (32 for the sm_80 prefill tile at BLOCK_D 128): some sequences fill
    # several splits, others leave splits empty.
    batch = build_paged_batch(seqs, 4, 2, head_dim, 16, dtype, seed=3)
    _check(batch, num_kv_splits=num_kv_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("seqs", "num_kv_splits"), [(DECODE, 4), (MIXED, 3), (DECODE, 32)])
def test_splits_cut_from_each_sequence(arch, dtype, seqs, num_kv_splits):
    """split_each_seq (a replayed CUDA graph): one launch for a much longer max_seqlen_k; each
    sequence's keys are cut into the splits, short ones leave most of them empty."""
    batch = build_paged_batch(seqs, 4, 2, 32, 16, dtype, seed=11)
    _check(batch, num_kv_splits=num_kv_splits, max_seqlen_k=8192, split_each_seq=True)


def test_head_dim_not_a_power_of_two(arch):
    _check(build_paged_batch(MIXED, 4, 2, 80, 16, torch.float16, seed=4))


def test_wide_group_and_tiny_head():
    # 32 query heads on one KV head: the group alone fills a 32-row tile.
    _check(build_paged_batch([(3, 1), (0, 5), (40, 2)], 32, 1, 16, 16, torch.float32, seed=5))


def test_many_sequences():
    gen = torch.Generator().manual_seed(6)
    prefixes = torch.randint(0, 40, (40,), generator=gen).tolist()
    q_lens = torch.randint(1, 4, (40,), generator=gen).tolist()
    seqs = list(zip(prefixes, q_lens, strict=True))
    _check(build_paged_batch(seqs, 4, 2, 16, 16, torch.float16, seed=6))


def test_single_sequence_chunk_on_prefix():
    _check(build_paged_batch([(40, 9)], 4, 2, 64, 16, torch.float16, seed=10))


def test_sequence_without_new_tokens_is_skipped():
    batch = build_paged_batch([(5, 3), (20, 0), (0, 4)], 4, 2, 16, 16, torch.float32, seed=7)
    _check(batch)


def test_lengths_read_from_the_tensors_when_not_given():
    batch = build_paged_batch(MIXED, 4, 2, 16, 16, torch.float32, seed=8)
    _check(batch, max_seqlen_q=None, max_seqlen_k=None)
    _check(batch, max_seqlen_q=None, max_seqlen_k=None, num_kv_splits=2)


def test_strided_queries():
    # q as a slice of a fused qkv projection: token stride larger than Hq * D.
    batch = build_paged_batch(MIXED, 4, 2, 16, 16, torch.float32, seed=9)
    fused = torch.randn(batch.q.shape[0], 8, 16)
    fused[:, 2:6] = batch.q
    batch.q = fused[:, 2:6]
    _check(batch)


def test_empty_batch_returns_empty():
    batch = build_paged_batch([(3, 1)], 4, 2, 16, 16, torch.float32)
    batch.q = batch.q[:0]
    batch.cu_seqlens_q = torch.zeros(2, dtype=torch.int32)
    assert _run(batch).shape == (0, 4, 16)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("q", torch.randn(4, 3, 16), "multiple of the cache's 2 KV heads"),
        ("q", torch.randn(4, 4, 32), "head_dim 32"),
        ("q", torch.randn(4, 4, 16, dtype=torch.float16), "one dtype"),
        ("q", torch.randn(4, 16, 4).transpose(1, 2), "last dim"),
        ("q", torch.randn(4, 64), "q must be"),
        ("seq_lens", torch.tensor([4], dtype=torch.int64), "seq_lens must have dtype"),
        ("cu_seqlens_q", torch.tensor([0, 4, 4], dtype=torch.int32), "num_seqs \\+ 1 = 2"),
        ("block_tables", torch.zeros(2, 1, dtype=torch.int32), "one row per sequence"),
        ("block_tables", torch.zeros(1, dtype=torch.int32), "block_tables must be"),
        ("k_cache", torch.randn(8, 16, 2, 16)[::2], "contiguous"),
        ("v_cache", torch.randn(3, 16, 2, 16), "one shape"),
        ("seq_lens", torch.tensor([4], dtype=torch.int32, device="meta"), "one device"),
    ],
)
def test_rejects_bad_arguments(field, value, message):
    batch = build_paged_batch([(0, 4)], 4, 2, 16, 16, torch.float32)
    setattr(batch, field, value)
    with pytest.raises(ValueError, match=message):
        _run(batch)


def test_rejects_zero_splits():
    batch = build_paged_batch([(0, 4)], 4, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="num_kv_splits"):
        _run(batch, num_kv_splits=0)
