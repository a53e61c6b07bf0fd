"""Attention over the paged KV pool, one interface for every device.

The model runner builds one AttentionMetadata per step; every layer then calls `store_kv` for its
new keys/values and `paged_attention` for its queries. On CUDA these are the Triton kernels in
`kernels/`; elsewhere the pure-torch references beside them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.paged_attention_ref import paged_attention_ref
from kernels.store_kv_ref import store_kv_ref


@dataclass
class AttentionMetadata:
    """Where one step's tokens go in the pool and what each sequence attends to.

    Tensors live on the model's device; the `*_host` lists are the same values on the host, so
    the CPU path can loop over sequences without a device sync.
    """

    slot_mapping: torch.Tensor  # [T] int64, pool slot of each new token (-1: padding, skipped)
    block_tables: torch.Tensor  # [B, M] int32, padded with 0 past each sequence's blocks
    cu_seqlens_q: torch.Tensor  # [B + 1] int32, offsets of each sequence's queries in the batch
    seq_lens: torch.Tensor  # [B] int32, KV length after this step (cached + new)
    max_seqlen_q: int
    max_seqlen_k: int
    cu_seqlens_q_host: list[int]
    seq_lens_host: list[int]


def _use_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> None:
    if _use_triton(key):
        from kernels.store_kv import store_kv as store_kv_triton

        store_kv_triton(key, value, k_cache, v_cache, meta.slot_mapping)
    else:
        store_kv_ref(key, value, k_cache, v_cache, meta.slot_mapping)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    if _use_triton(q):
        from kernels.paged_attention import paged_attention as paged_attention_triton

        return paged_attention_triton(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.cu_seqlens_q,
            meta.seq_lens,
            scale,
            max_seqlen_q=meta.max_seqlen_q,
            max_seqlen_k=meta.max_seqlen_k,
        )
    return paged_attention_ref(
        q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q_host, meta.seq_lens_host, scale
    )
