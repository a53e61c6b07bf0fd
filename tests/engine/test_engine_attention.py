"""The CPU decode fast path against the paged-attention reference."""

import pytest
import torch

from app.engine.network.attention import (
    attention_per_sequence,
    decode_key_mask,
    padded_decode_attention,
)
from kernels.paged_attention_ref import paged_attention_ref


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


def test_the_per_sequence_cpu_path_matches_the_reference():
    """Fresh prefills (causal fast path), chunks on cached prefixes and decodes, mixed."""
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
    expected = paged_attention_ref(q, k_cache, v_cache, block_tables, cu, seq_lens, 0.3)
    got = attention_per_sequence(q, k_cache, v_cache, block_tables, cu, seq_lens, 0.3)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
