"""The CUDA backend: the Triton kernels in kernels/ (store_kv.py, paged_attention.py), which read
the step's metadata as it is and keep no state between steps.

Also built by name on a CPU pool (create_backend(kv_caches, "triton"), the engine's
attention_backend="triton") where the kernels were defined under Triton's interpreter: the CPU
tests of the whole engine through this path (tests/kernels/test_engine_triton_path.py); elsewhere
it refuses to start.

`warm_up` launches every kernel variant the launchers can choose for the model (decode and
prefill tiles, with and without key splits, every split count's combine kernel), so that Triton
compiles them before the service reports ready rather than during somebody's long-context turn.
"""

from __future__ import annotations

import torch

from app.engine.network.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    KVCaches,
    StepOwners,
)
from kernels import variants
from kernels._checks import require_launchable
from kernels.paged_attention import (
    _paged_attention_kernel,
    device_arch,
    max_kv_splits,
    paged_attention,
    paged_attention_variants,
)
from kernels.store_kv import _store_kv_kernel, store_kv


class TritonBackend(AttentionBackend):
    reads_metadata_only = True  # the kernels keep no state between steps: CUDA graphs replay it

    def __init__(self, kv_caches: KVCaches) -> None:
        # At start, not at the first step: a CPU pool needs the interpreted kernels.
        device = kv_caches[0][0].device
        require_launchable(_store_kv_kernel, device)
        require_launchable(_paged_attention_kernel, device)
        self.k_cache, self.v_cache = kv_caches[0]  # every layer has this shape and dtype

    def prepare(
        self,
        meta: AttentionMetadata,
        *,
        seq_ids: tuple[int, ...],
        cu_seqlens_q: list[int],
        seq_lens: list[int],
        owners: StepOwners | None = None,
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
            split_each_seq=meta.replayed,
        )

    def finish_step(self) -> None:
        pass

    def warm_up(self, num_heads: int, max_model_len: int) -> int:
        """Launch every variant the kernels can choose for this pool, queries of `num_heads`
        heads and contexts up to max_model_len; returns how many variants that was. Writes
        nothing to the pool (every slot is -1)."""
        k_cache, v_cache = self.k_cache, self.v_cache
        device, dtype = k_cache.device, k_cache.dtype
        block_size, num_kv_heads, head_dim = k_cache.shape[1:]
        splits = max_kv_splits(device, num_kv_heads, max_model_len)
        before = variants.used()
        for _, max_seqlen_q, num_kv_splits in paged_attention_variants(
            num_heads, num_kv_heads, head_dim, dtype, block_size, splits, arch=device_arch(device)
        ):
            q = torch.zeros(max_seqlen_q, num_heads, head_dim, dtype=dtype, device=device)
            kv = torch.zeros(max_seqlen_q, num_kv_heads, head_dim, dtype=dtype, device=device)
            store_kv(kv, kv, k_cache, v_cache, torch.full((max_seqlen_q,), -1, device=device))
            num_blocks = -(-max_seqlen_q // block_size)
            paged_attention(
                q,
                k_cache,
                v_cache,
                torch.zeros(1, num_blocks, dtype=torch.int32, device=device),
                torch.tensor([0, max_seqlen_q], dtype=torch.int32, device=device),
                torch.tensor([max_seqlen_q], dtype=torch.int32, device=device),
                1.0,
                max_seqlen_q=max_seqlen_q,
                # 256 keys a split, as the launcher cuts them for this many splits
                max_seqlen_k=num_kv_splits * 256,
                num_kv_splits=num_kv_splits,
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return len(variants.used() - before)
