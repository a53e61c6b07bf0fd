"""Triton KV store: write one step's new keys and values into their slots of the paged pool.

    key, value:        [T, Hkv, D]  the new tokens of this step, flat over the batch
    k_cache, v_cache:  [N, bs, Hkv, D]  the pool of one layer (each contiguous)
    slot_mapping:      [T] int64  slot = block_id * bs + offset; a negative slot is skipped (padding)

Same contract as `kernels/store_kv_ref.py`. A contiguous cache makes slot s start at element
s * Hkv * D, so the block/offset split never has to be done. One program copies one token's
heads (or a group of them for very wide heads); keys may be strided views (e.g. a slice of a
fused qkv projection) as long as the head dim is contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import variants
from kernels._checks import (
    KERNEL_DTYPES,
    device_guard,
    require_dtype,
    require_kv_pool,
    require_launchable,
    require_ndim,
    require_same_device,
    require_unit_last_stride,
)

# Elements one program moves per tensor; wider tokens are split over more programs.
_MAX_TILE_ELEMENTS = 2048


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    num_slots,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token)
    if slot < 0:  # padding token: nothing to store
        return
    # The host cannot check slot values without a device sync. Compiled with TRITON_DEBUG=1 a
    # slot past the pool traps; otherwise it is dropped rather than written outside the pool.
    tl.device_assert(slot < num_slots, "store_kv: slot_mapping points past the end of the pool")
    if slot >= num_slots:
        return

    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)

    token64 = token.to(tl.int64)
    k = tl.load(
        key_ptr + token64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask
    )
    v = tl.load(
        value_ptr + token64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask
    )
    dst = slot * (NUM_KV_HEADS * HEAD_DIM) + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write key[t], value[t] into slot slot_mapping[t] of k_cache, v_cache (in place).

    Slots must be distinct (two tokens writing one slot race); negative slots are skipped, and so
    are slots past num_blocks * block_size (checking them would cost a device sync; the
    reference raises instead). Keys and values are cast to the cache dtype.
    """
    _check_store_kv_args(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, _MAX_TILE_ELEMENTS // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    variant = _store_kv_variant(num_kv_heads, head_dim)
    variants.record(variant)
    with device_guard(key):
        _store_kv_kernel[grid](
            key,
            value,
            k_cache,
            v_cache,
            slot_mapping,
            k_cache.shape[0] * k_cache.shape[1],
            key.stride(0),
            key.stride(1),
            value.stride(0),
            value.stride(1),
            **variant.constants,
            num_warps=variant.num_warps,
            num_stages=variant.num_stages,
        )


def _store_kv_variant(num_kv_heads: int, head_dim: int) -> variants.Variant:
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, _MAX_TILE_ELEMENTS // block_d))
    constexprs = {
        "NUM_KV_HEADS": num_kv_heads,
        "HEAD_DIM": head_dim,
        "BLOCK_H": block_h,
        "BLOCK_D": block_d,
    }
    return variants.Variant.of("store_kv", constexprs, num_warps=4, num_stages=3)


def store_kv_variants(num_kv_heads: int, head_dim: int) -> list[variants.Variant]:
    """The compiled variants the launcher can choose for a model (one: the shape fixes it; the
    dtypes of keys and cache specialize it too, and the engine keeps both at the model's)."""
    return [_store_kv_variant(num_kv_heads, head_dim)]


def _check_store_kv_args(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    require_ndim("key", key, 3, "[num_tokens, num_kv_heads, head_dim]")
    require_ndim("value", value, 3, "[num_tokens, num_kv_heads, head_dim]")
    if key.shape != value.shape:
        raise ValueError(
            f"key and value must have one shape, got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    require_dtype("key", key, *KERNEL_DTYPES)
    require_dtype("value", value, *KERNEL_DTYPES)
    require_unit_last_stride("key", key)
    require_unit_last_stride("value", value)
    require_kv_pool(k_cache, v_cache)
    if key.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"key is [T, Hkv, D] = {tuple(key.shape)} but the pool holds "
            f"[Hkv, D] = {tuple(k_cache.shape[2:])} per slot"
        )
    require_ndim("slot_mapping", slot_mapping, 1, "[num_tokens]")
    require_dtype("slot_mapping", slot_mapping, torch.int64)
    if slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(
            f"slot_mapping has {slot_mapping.shape[0]} entries for {key.shape[0]} tokens"
        )
    require_unit_last_stride("slot_mapping", slot_mapping)
    device = require_same_device(
        key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping
    )
    require_launchable(_store_kv_kernel, device)
