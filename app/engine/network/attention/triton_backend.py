"""The CUDA backend: the Triton kernels in kernels/ (store_kv.py, paged_attention.py), which read
the step's metadata as it is and keep no state between steps."""

from __future__ import annotations

import torch

from app.engine.network.attention.base import AttentionBackend, AttentionMetadata, KVCaches
from kernels.paged_attention import paged_attention
from kernels.store_kv import store_kv


class TritonBackend(AttentionBackend):
    def __init__(self, kv_caches: KVCaches) -> None:
        del kv_caches  # nothing to derive from the pool

    def prepare(
        self,
        meta: AttentionMetadata,
        *,
        seq_ids: tuple[int, ...],
        cu_seqlens_q: list[int],
        seq_lens: list[int],
    ) -> None:
        pass  # the kernels read the step's metadata as it is

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        store_kv(key, value, k_cache, v_cache, meta.slot_mapping)

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        layer: int,
    ) -> torch.Tensor:
        return paged_attention(
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

    def finish_step(self) -> None:
        pass
