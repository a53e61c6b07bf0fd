"""Random paged batches and the kernels' tolerance table, for tests/kernels/ and bench/gpu_check.py.

Needs only torch: no app/ import, no pytest. It does not import the kernels either, so a caller
may still set TRITON_INTERPRET after importing it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The kernel contract: |out - ref| <= atol + rtol * |ref|, by the dtype of q and the pool.
TOLERANCES = {
    # fp32: IEEE dots and fp32 accumulators, like the reference; only the summation order differs.
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    # fp16: 11-bit mantissa in q, K, V, the output, and P (rounded to fp16 for P @ V).
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    # bf16: the same roundings with an 8-bit mantissa, 8x fp16's step; 10x fp16's tolerance.
    torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2},
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

    def attention_args(self) -> tuple:
        """The positional arguments of paged_attention and paged_attention_ref, in order."""
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.cu_seqlens_q,
            self.seq_lens,
            self.scale,
        )

    def max_seqlens(self) -> dict[str, int]:
        """paged_attention's max_seqlen_q and max_seqlen_k keywords."""
        return {"max_seqlen_q": self.max_seqlen_q, "max_seqlen_k": self.max_seqlen_k}


def build_paged_batch(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> PagedBatch:
    """seqs: (cached prefix length, new query length) per sequence.

    Every slot that holds no valid key is NaN, and each sequence's blocks are scattered over
    the pool, so a kernel that reads a wrong slot or forgets a mask gives NaN or a wrong value.
    The random numbers come from a generator on `device` seeded with `seed`: on the CPU a seed
    gives one batch everywhere, and a large GPU batch is not drawn on the host.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    seq_lens = [prefix + q_len for prefix, q_len in seqs]
    blocks_per_seq = [-(-length // block_size) for length in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks that nobody owns
    order = torch.randperm(num_blocks, generator=gen, device=device).cpu()
    block_tables = torch.zeros(len(seqs), max(max(blocks_per_seq), 1), dtype=torch.int32)
    slots = []
    next_block = 0
    for b, (length, count) in enumerate(zip(seq_lens, blocks_per_seq, strict=True)):
        block_tables[b, :count] = order[next_block : next_block + count].int()
        next_block += count
        pos = torch.arange(length)
        slots.append(block_tables[b, pos // block_size].long() * block_size + pos % block_size)
    all_slots = torch.cat(slots).to(device)

    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    pool = torch.full(shape, float("nan"), dtype=dtype, device=device)
    fresh = torch.randn(2, all_slots.numel(), num_kv_heads, head_dim, generator=gen, device=device)
    pool.view(2, -1, num_kv_heads, head_dim)[:, all_slots] = fresh.to(dtype)

    q_lens = [q_len for _, q_len in seqs]
    cu_seqlens_q = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_seqlens_q[1:] = torch.tensor(q_lens).cumsum(0)
    num_tokens = int(cu_seqlens_q[-1])
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen, device=device).to(dtype)
    return PagedBatch(
        q=q,
        k_cache=pool[0],
        v_cache=pool[1],
        block_tables=block_tables.to(device),
        cu_seqlens_q=cu_seqlens_q.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        scale=head_dim**-0.5,
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(seq_lens),
    )
