"""Pure-torch KV store: the reference for the Triton kernel and the CPU path of the engine.

key, value:        [T, Hkv, D]  the new tokens of this step, flat over the batch
k_cache, v_cache:  [N, bs, Hkv, D]  the pool of one layer
slot_mapping:      [T] int64  slot = block_id * bs + offset; a negative slot is skipped (padding)
"""

from __future__ import annotations

import torch


def store_kv_ref(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, value.to(v_cache.dtype))
