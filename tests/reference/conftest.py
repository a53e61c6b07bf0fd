"""Shared helpers for the reference tests: run one sequence through the engine's model."""

from __future__ import annotations

import pytest
import torch

from app.engine.network.attention import AttentionMetadata, create_backend
from app.engine.network.model import CausalLM


def paged_logits(
    model: CausalLM,
    input_ids: list[int],
    block_size: int = 4,
    chunk_sizes: list[int] | None = None,
) -> torch.Tensor:
    """Float32 logits [T, vocab] of one sequence, run through a small paged KV pool.

    The sequence's blocks are laid out in reverse pool order so that paging is exercised (a
    model that ignored the block table would read the wrong keys). `chunk_sizes` splits the
    prefill into steps that each attend over the KV the previous steps stored.
    """
    config = model.config
    device, dtype = model.model.embed_tokens.weight.device, model.model.embed_tokens.weight.dtype
    num_tokens = len(input_ids)
    num_blocks = (num_tokens + block_size - 1) // block_size
    pool_blocks = num_blocks + 2
    block_ids = list(range(pool_blocks - 1, pool_blocks - 1 - num_blocks, -1))
    kv_caches = [
        (
            torch.zeros(
                pool_blocks,
                block_size,
                config.num_kv_heads,
                config.head_dim,
                device=device,
                dtype=dtype,
            ),
            torch.zeros(
                pool_blocks,
                block_size,
                config.num_kv_heads,
                config.head_dim,
                device=device,
                dtype=dtype,
            ),
        )
        for _ in range(config.num_layers)
    ]
    block_table = torch.tensor([block_ids], dtype=torch.int32, device=device)
    attn = create_backend(kv_caches)
    chunk_sizes = chunk_sizes or [num_tokens]
    assert sum(chunk_sizes) == num_tokens, "chunks must cover the sequence"

    logits = []
    start = 0
    for size in chunk_sizes:
        end = start + size
        positions = list(range(start, end))
        slots = [block_ids[p // block_size] * block_size + p % block_size for p in positions]
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            block_tables=block_table,
            cu_seqlens_q=torch.tensor([0, size], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([end], dtype=torch.int32, device=device),
            max_seqlen_q=size,
            max_seqlen_k=end,
        )
        attn.prepare(meta, seq_ids=(0,), cu_seqlens_q=[0, size], seq_lens=[end])
        with torch.inference_mode():
            hidden = model(
                torch.tensor(input_ids[start:end], device=device),
                torch.tensor(positions, device=device),
                kv_caches,
                meta,
                attn,
            )
            attn.finish_step()
            logits.append(model.compute_logits(hidden))
        start = end
    return torch.cat(logits)


@pytest.fixture(scope="session")
def run_paged():
    """The `paged_logits` helper, as a fixture (conftest modules are not importable by name)."""
    return paged_logits
