"""The CUDA backend: the Triton kernels in kernels/ (store_kv.py, paged_attention.py), which read
the step's metadata as it is and keep no state between steps.

Also built by name on a CPU pool (create_backend(kv_caches, "triton"), the engine's
attention_backend="triton") where the kernels were defined under Triton's interpreter: the CPU
tests of the whole engine through this path (tests/kernels/test_engine_triton_path.py); elsewhere
it refuses to start.
"""

from __future__ import annotations

import torch

from app.engine.network.attention.base import AttentionBackend, AttentionMetadata, KVCaches
from kernels._checks import require_launchable
from kernels.paged_attention import _paged_attention_kernel, paged_attention
from kernels.store_kv import _store_kv_kernel, store_kv


class TritonBackend(AttentionBackend):
    def __init__(self, kv_caches: KVCaches) -> None:
        # At start, not at the first step: a CPU pool needs the interpreted kernels.
        device = kv_caches[0][0].device
        require_launchable(_store_kv_kernel, device)
        require_launchable(_paged_attention_kernel, device)

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
