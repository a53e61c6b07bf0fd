"""The backend choice; the CPU backend: its decode fast path against the paged-attention
reference, and the reference (its path for every other step) against attention written out in
full. (The Triton backend on the CPU, under the interpreter: tests/kernels/.)"""

import pytest
import torch

from app.engine.network.attention import create_backend
from app.engine.network.attention.base import AttentionMetadata, backend_name
from app.engine.network.attention.cpu_backend import (
    CPUBackend,
    decode_key_mask,
    padded_decode_attention,
)
from kernels.paged_attention_ref import chunk_masks, gather_kv, paged_attention_ref


def test_the_backend_is_the_devices_own_unless_one_is_named():
    assert backend_name(torch.device("cuda")) == "triton"
    assert backend_name(torch.device("cpu")) == "torch"
    assert backend_name(torch.device("meta")) == "torch"  # any device without its own
    assert backend_name(torch.device("cpu"), "triton") == "triton"
    assert backend_name(torch.device("cuda"), "torch") == "torch"
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        backend_name(torch.device("cpu"), "flash")
    pool = [(torch.zeros(4, 2, 1, 8), torch.zeros(4, 2, 1, 8))]
    assert isinstance(create_backend(pool), CPUBackend)
    assert isinstance(create_backend(pool, "torch"), CPUBackend)


def scattered_block_tables(
    seq_lens: list[int], num_blocks: int, block_size: int, gen: torch.Generator
) -> torch.Tensor:
    """[B, M] block tables over a shuffled pool, padded with block 0."""
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables, at = [], 0
    for n in seq_lens:
        nb = -(-n // block_size)
        tables.append(perm[at : at + nb])
        at += nb
    max_blocks = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables])


@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 2), (6, 6), (8, 1)])
def test_padded_decode_attention_matches_the_reference(num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(num_heads * 10 + num_kv_heads)
    num_blocks, block_size, head_dim = 23, 5, 12
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    seq_lens = [1, 5, 6, 17, 11]  # a single key, a full block, block + 1, awkward lengths
    block_tables = scattered_block_tables(seq_lens, num_blocks, block_size, gen)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=gen)
    scale = head_dim**-0.5

    expected = paged_attention_ref(
        q, k_cache, v_cache, block_tables, list(range(len(seq_lens) + 1)), seq_lens, scale
    )
    mask = decode_key_mask(torch.tensor(seq_lens), block_tables.shape[1] * block_size)
    got = padded_decode_attention(q, k_cache, v_cache, block_tables, mask, scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def dense_causal_attention(q, k, v, scale):
    """softmax(q k^T * scale) v over one sequence's keys [S, Hq, D], query j of q [q_len, Hq, D]
    seeing keys up to position S - q_len + j: the maths with no fused kernel in between."""
    q_len, seq_len = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    visible = torch.arange(seq_len)[None, :] <= torch.arange(seq_len - q_len, seq_len)[:, None]
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.double()).to(q.dtype)


def test_the_per_sequence_path_matches_attention_written_out():
    """The reference's loop, which the CPU backend runs for every step that is not all decodes,
    in SDPA's fused shapes: fresh prefills (SDPA's own causal mask), chunks on cached prefixes
    and decodes, mixed."""
    gen = torch.Generator().manual_seed(5)
    num_blocks, block_size, num_heads, num_kv_heads, head_dim = 40, 4, 6, 2, 8
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    seq_lens = [9, 13, 1, 7, 22]
    q_lens = [9, 5, 1, 1, 22]  # fresh, chunk on 8 cached, single-token fresh, decode, fresh
    block_tables = scattered_block_tables(seq_lens, num_blocks, block_size, gen)
    cu = [0]
    for n in q_lens:
        cu.append(cu[-1] + n)
    q = torch.randn(cu[-1], num_heads, head_dim, generator=gen)
    got = paged_attention_ref(q, k_cache, v_cache, block_tables, cu, seq_lens, 0.3)
    group = num_heads // num_kv_heads
    for b, seq_len in enumerate(seq_lens):
        blocks = block_tables[b, : -(-seq_len // block_size)]
        k = k_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, dim=1)
        expected = dense_causal_attention(q[cu[b] : cu[b + 1]], k, v, 0.3)
        torch.testing.assert_close(got[cu[b] : cu[b + 1]], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_heads, num_kv_heads", [(6, 2), (4, 4), (8, 1)])
def test_a_short_turn_on_a_consecutive_history_reads_the_pool_in_place(num_heads, num_kv_heads):
    """A thread whose blocks are consecutive in the pool: its keys are a view (no copy of the
    history), grouped heads are not repeated, and the result is attention written out."""
    gen = torch.Generator().manual_seed(num_heads + num_kv_heads)
    num_blocks, block_size, head_dim = 30, 4, 8
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    seq_lens = [41, 23]  # 3 new tokens on 38 cached; a fresh prefill of 23
    block_tables = torch.tensor([list(range(5, 16)), list(range(17, 23)) + [0] * 5])
    k = gather_kv(k_cache, block_tables[0], seq_lens[0])
    assert k.untyped_storage().data_ptr() == k_cache.untyped_storage().data_ptr()  # a view
    cu = [0, 3, 26]
    q = torch.randn(cu[-1], num_heads, head_dim, generator=gen)
    got = paged_attention_ref(q, k_cache, v_cache, block_tables, cu, seq_lens, 0.35)
    group = num_heads // num_kv_heads
    for b, seq_len in enumerate(seq_lens):
        blocks = block_tables[b, : -(-seq_len // block_size)]
        k = k_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:seq_len].repeat_interleave(group, dim=1)
        expected = dense_causal_attention(q[cu[b] : cu[b + 1]], k, v, 0.35)
        torch.testing.assert_close(got[cu[b] : cu[b + 1]], expected, atol=1e-5, rtol=1e-5)


def test_chunk_masks_built_once_give_the_same_attention():
    """The CPU backend builds each chunk's mask once a step (chunk_masks) for every layer: the
    same result, bit for bit, as the reference building it per call; a fresh prefill and a
    decode need none."""
    gen = torch.Generator().manual_seed(9)
    num_blocks, block_size, num_heads, num_kv_heads, head_dim = 40, 4, 6, 2, 8
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    seq_lens, q_lens = [9, 13, 7], [9, 5, 1]  # fresh, a chunk on 8 cached, a decode
    block_tables = scattered_block_tables(seq_lens, num_blocks, block_size, gen)
    cu = [0, 9, 14, 15]
    q = torch.randn(cu[-1], num_heads, head_dim, generator=gen)
    masks = chunk_masks(cu, seq_lens, q.device)
    assert masks[0] is None and masks[2] is None
    assert masks[1].shape == (5, 13) and masks[1].dtype == torch.float32
    assert (masks[1] == 0).sum(dim=1).tolist() == [9, 10, 11, 12, 13]  # bottom-right causal
    want = paged_attention_ref(q, k_cache, v_cache, block_tables, cu, seq_lens, 0.3)
    got = paged_attention_ref(q, k_cache, v_cache, block_tables, cu, seq_lens, 0.3, masks=masks)
    assert torch.equal(got, want)

    backend = CPUBackend([(k_cache, v_cache)])
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(cu[-1], dtype=torch.int64),
        block_tables=block_tables.int(),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(seq_lens),
    )
    backend.prepare(meta, seq_ids=(0, 1, 2), cu_seqlens_q=cu, seq_lens=seq_lens)
    assert [m is None for m in backend._chunk_masks] == [True, False, True]
    out = backend.forward(q, k_cache, v_cache, meta, 0.3, layer=0)
    assert torch.equal(out, want)
