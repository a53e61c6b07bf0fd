"""Attention over the paged KV pool, one interface for every device.

The model runner builds one AttentionMetadata per step; every layer then calls `store_kv` for its
new keys/values and `paged_attention` for its queries. On CUDA these are the Triton kernels in
`kernels/`; elsewhere the pure-torch store and, for attention, the same computation as
kernels/paged_attention_ref.py arranged for speed (tests compare the two): one padded batched
attention for a step of decodes, else a loop over sequences in the shapes SDPA's fused CPU
kernel takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kernels.paged_attention_ref import gather_kv
from kernels.store_kv_ref import store_kv_ref

if TYPE_CHECKING:
    from app.engine.network.decode_mirror import MirrorStep


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
    # CPU fast paths for a step of decodes only (one query per sequence), else None:
    # the batch's keys kept contiguous across steps (decode_mirror.py), or else every
    # sequence's blocks padded to the longest table and which key positions are real.
    decode_mirror: MirrorStep | None = None
    decode_blocks: torch.Tensor | None = None  # [B, M] int64
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, M * block_size] float32, 0 or -inf


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
    layer: int,
) -> torch.Tensor:
    """Attention of the step's queries [T, Hq, D] over the pool of `layer` (its index in the
    model), which already holds the step's new keys and values."""
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
    if meta.decode_mirror is not None:
        k, v = meta.decode_mirror.keys_values(layer, k_cache, v_cache)
        return decode_attention(q, k, v, meta.decode_mirror.mask, scale)
    if meta.decode_blocks is not None:
        return padded_decode_attention(
            q, k_cache, v_cache, meta.decode_blocks, meta.decode_mask, scale
        )
    return attention_per_sequence(
        q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q_host, meta.seq_lens_host, scale
    )


def attention_per_sequence(
    q: torch.Tensor,  # [T, Hq, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: list[int],
    seq_lens: list[int],
    scale: float,
) -> torch.Tensor:
    """paged_attention_ref's loop over sequences, in the shapes SDPA's fused CPU kernel takes:
    4-D inputs (3-D ones fall back to the unfused path, which materialises every score), and a
    first prefill (no cached prefix) with SDPA's own causal mask instead of a built one."""
    group = q.shape[1] // k_cache.shape[2]
    out = torch.empty_like(q)
    for b, seq_len in enumerate(seq_lens):
        start, end = cu_seqlens_q[b], cu_seqlens_q[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[b], seq_len)  # [S, Hkv, D]
        v = gather_kv(v_cache, block_tables[b], seq_len)
        if group > 1:
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        mask = None
        if 1 < q_len < seq_len:  # a chunk on a cached prefix: bottom-right aligned causal
            qpos = torch.arange(seq_len - q_len, seq_len, device=q.device).unsqueeze(1)
            mask = torch.arange(seq_len, device=q.device).unsqueeze(0) <= qpos  # [q_len, S]
        ob = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).unsqueeze(0).float(),  # [1, Hq, q_len, D]
            k.transpose(0, 1).unsqueeze(0).float(),  # [1, Hq, S, D]
            v.transpose(0, 1).unsqueeze(0).float(),
            attn_mask=mask,
            is_causal=q_len > 1 and q_len == seq_len,
            scale=scale,
        )
        out[start:end] = ob[0].transpose(0, 1).to(q.dtype)
    return out


def decode_key_mask(seq_lens: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B, 1, 1, num_keys] additive float32 mask for padded_decode_attention: 0 for the keys below
    each sequence's length, -inf past it. Built once a step and added in every layer."""
    past_end = torch.arange(num_keys, device=seq_lens.device) >= seq_lens.unsqueeze(1)  # [B, K]
    mask = torch.zeros(past_end.shape, dtype=torch.float32, device=seq_lens.device)
    return mask.masked_fill_(past_end, float("-inf"))[:, None, None, :]


def padded_decode_attention(
    q: torch.Tensor,  # [B, Hq, D], one query per sequence
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,
    blocks: torch.Tensor,  # [B, M] each sequence's block table, padded
    mask: torch.Tensor,  # [B, 1, 1, M * bs] decode_key_mask(seq_lens, M * bs)
    scale: float,
) -> torch.Tensor:
    """Decode attention of the whole batch at once instead of a loop over sequences: the
    same result as paged_attention_ref with every q_len 1. Whole blocks are gathered (one copy
    per block, not per token); the mask hides their tail and the padding. Returns [B, Hq, D]."""
    k = gather_padded(k_cache, blocks)
    v = gather_padded(v_cache, blocks)
    return decode_attention(q, k, v, mask, scale)


def gather_padded(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Every sequence's blocks from a pool [N, bs, Hkv, D], as [B, Hkv, M * bs, D] (a
    transposed view of one copy). blocks: [B, M] padded block tables."""
    batch = blocks.shape[0]
    _, _, num_kv_heads, head_dim = cache.shape
    gathered = cache.index_select(0, blocks.reshape(-1))  # [B * M, bs, Hkv, D]
    return gathered.view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)


def decode_attention(
    q: torch.Tensor,  # [B, Hq, D], one query per sequence
    k: torch.Tensor,  # [B, Hkv, K, D], each sequence's keys padded to K
    v: torch.Tensor,
    mask: torch.Tensor,  # [B, 1, 1, K] 0 or -inf
    scale: float,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v for a step of decodes, as batched products over (sequence,
    KV head): the query heads sharing a KV head stand in as its rows, so K/V are not repeated.
    (At one query row per head, SDPA's fused CPU kernel costs more than these few calls.)
    Returns [B, Hq, D]."""
    batch, num_heads, head_dim = q.shape
    _, num_kv_heads, num_keys, _ = k.shape
    rows, group = batch * num_kv_heads, num_heads // num_kv_heads
    qg = q.reshape(rows, group, head_dim).float() * scale
    k = k.reshape(rows, num_keys, head_dim).float()  # views of the decode mirror's buffers
    v = v.reshape(rows, num_keys, head_dim).float()
    scores = torch.bmm(qg, k.transpose(1, 2)).view(batch, num_heads, num_keys)
    scores.add_(mask.view(batch, 1, num_keys))  # the mask broadcast over the heads, no copy
    probs = torch.softmax(scores, dim=-1).view(rows, group, num_keys)
    return torch.bmm(probs, v).view(batch, num_heads, head_dim).to(q.dtype)
