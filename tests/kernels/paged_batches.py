"""Random paged batches for the kernel tests (and the contract's tolerances)."""

from dataclasses import dataclass

import torch

# Tolerances of the kernel contract: |out - ref| <= atol + rtol * |ref|.
TOLERANCES = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
}


@dataclass
class PagedBatch:
    """A flat batch of sequences whose KV lives in shuffled blocks of one pool."""

    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [N, bs, Hkv, D], a view of the pool
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, M] int32
    cu_seqlens_q: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    scale: float
    max_seqlen_q: int
    max_seqlen_k: int


def build_paged_batch(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> PagedBatch:
    """seqs: (cached prefix length, new query length) per sequence.

    Every slot that holds no valid key is NaN, and each sequence's blocks are scattered over
    the pool, so a kernel that reads a wrong slot or forgets a mask gives NaN or a wrong value.
    """
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [prefix + q_len for prefix, q_len in seqs]
    blocks_per_seq = [-(-length // block_size) for length in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks that nobody owns
    order = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(seqs), max(max(blocks_per_seq), 1), dtype=torch.int32)
    slots = []
    next_block = 0
    for b, (length, count) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        block_tables[b, :count] = order[next_block : next_block + count].int()
        next_block += count
        pos = torch.arange(length)
        slots.append(block_tables[b, pos // block_size].long() * block_size + pos % block_size)
    all_slots = torch.cat(slots)

    pool = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    fresh = torch.randn(2, all_slots.numel(), num_kv_heads, head_dim, generator=gen)
    pool.view(2, -1, num_kv_heads, head_dim)[:, all_slots] = fresh
    pool = pool.to(dtype)

    q_lens = [q_len for _, q_len in seqs]
    cu_seqlens_q = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_seqlens_q[1:] = torch.tensor(q_lens).cumsum(0)
    q = torch.randn(int(cu_seqlens_q[-1]), num_heads, head_dim, generator=gen).to(dtype)
    return PagedBatch(
        q=q,
        k_cache=pool[0],
        v_cache=pool[1],
        block_tables=block_tables,
        cu_seqlens_q=cu_seqlens_q,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        scale=head_dim**-0.5,
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(seq_lens),
    )
