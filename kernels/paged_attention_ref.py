"""Pure-torch paged attention: the reference for the Triton kernel, and the engine's CPU backend
for every step that is not all decodes.

The batch is flat: the new query tokens of B sequences stand one after another.

    q:             [T, Hq, D]   T = sum of the query lengths
    cu_seqlens_q:  [B + 1]      sequence b owns q[cu_seqlens_q[b] : cu_seqlens_q[b + 1]]
    seq_lens:      [B]          KV length of sequence b after this step (cached prefix + new tokens)
    block_tables:  [B, M]       pool block ids of sequence b; only the first ceil(seq_len/bs) count

The new tokens are the last ones of each sequence, so query j of sequence b (q_len = its count)
sits at absolute position  p = seq_lens[b] - q_len + j  and attends causally to keys 0..p:

    keys:    0 1 2 3 4 5 6 7        seq_len = 8, q_len = 3 (a prefill chunk on a 5-token prefix)
    query 0: x x x x x x . .        position 5
    query 1: x x x x x x x .        position 6
    query 2: x x x x x x x x        position 7

A decode step is the case q_len = 1; a first prefill is q_len = seq_len. Keys and values of the new
tokens must already be in the pool (store_kv runs first). Grouped-query heads: query head h reads
KV head h // (Hq // Hkv) (SDPA's enable_gqa: the KV heads are never repeated in memory).
Accumulation is float32 whatever the input dtype.

A sequence whose blocks stand in consecutive pool blocks (a thread that grew alone) is read as a
view of the pool, not gathered: a short turn on a long history then copies none of it. A caller
that attends over the same step in every layer builds the chunks' masks once (`chunk_masks`)
and passes them in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first seq_len tokens of one sequence from a pool [N, bs, Hkv, D] -> [seq_len, Hkv, D]."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    table = block_table[:num_blocks].long()
    first = int(table[0])
    if num_blocks == 1 or bool((table.diff() == 1).all()):  # consecutive: a view, no copy
        return cache.flatten(0, 1)[first * block_size : first * block_size + seq_len]
    blocks = cache.index_select(0, table)  # [nb, bs, Hkv, D]
    return blocks.flatten(0, 1)[:seq_len]


def chunk_mask(q_len: int, seq_len: int, device: torch.device) -> torch.Tensor | None:
    """The additive float32 mask [q_len, seq_len] of a chunk on a cached prefix: query j sees
    keys up to position seq_len - q_len + j (bottom-right aligned causal), 0 there and -inf past
    it. None where SDPA needs none: a single query sees every key, and a first prefill (q_len ==
    seq_len) takes SDPA's own causal mask."""
    if not 1 < q_len < seq_len:
        return None
    qpos = torch.arange(seq_len - q_len, seq_len, device=device).unsqueeze(1)
    kpos = torch.arange(seq_len, device=device).unsqueeze(0)
    mask = torch.zeros(q_len, seq_len, dtype=torch.float32, device=device)
    return mask.masked_fill_(kpos > qpos, float("-inf"))


def chunk_masks(
    cu_seqlens_q: list[int], seq_lens: list[int], device: torch.device
) -> list[torch.Tensor | None]:
    """Every sequence's `chunk_mask` for one step: built once, read by every layer (SDPA turns
    a boolean mask into this float one inside each call otherwise)."""
    return [
        chunk_mask(cu_seqlens_q[b + 1] - cu_seqlens_q[b], seq_len, device)
        for b, seq_len in enumerate(seq_lens)
    ]


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: list[int] | torch.Tensor,
    seq_lens: list[int] | torch.Tensor,
    scale: float,
    masks: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached + new keys. Returns
    [T, Hq, D]. `masks`: the step's `chunk_masks` when the caller keeps them across layers."""
    cu = cu_seqlens_q.tolist() if isinstance(cu_seqlens_q, torch.Tensor) else cu_seqlens_q
    lens = seq_lens.tolist() if isinstance(seq_lens, torch.Tensor) else seq_lens
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for b, seq_len in enumerate(lens):
        start, end = cu[b], cu[b + 1]
        q_len = end - start
        if q_len == 0:
            continue
        k = gather_kv(k_cache, block_tables[b], seq_len)  # [S, Hkv, D]
        v = gather_kv(v_cache, block_tables[b], seq_len)
        mask = chunk_mask(q_len, seq_len, q.device) if masks is None else masks[b]
        # The engine's CPU backend serves prefills with this very loop, so it takes the shapes
        # SDPA's fused CPU kernel takes: 4-D inputs (3-D ones fall back to the unfused path,
        # which materialises every score), and on a first prefill (q_len == seq_len, where
        # bottom-right and top-left alignment agree) SDPA's own causal mask, not a built one.
        ob = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).unsqueeze(0).float(),  # [1, Hq, q_len, D]
            k.transpose(0, 1).unsqueeze(0).float(),  # [1, Hkv, S, D]
            v.transpose(0, 1).unsqueeze(0).float(),
            attn_mask=mask,
            is_causal=q_len > 1 and q_len == seq_len,
            scale=scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        out[start:end] = ob[0].transpose(0, 1).to(q.dtype)
    return out
