"""Attention of one sequence's new queries over its keys held head-major, on the CPU.

The CPU backend's mirror (thread_mirror.py) keeps every running thread's keys and values as

    k, v: [Hkv, S, D]      each KV head's keys one contiguous [S, D] matrix

so a chunk of new queries (a turn's message on a cached history) attends with two matrix
products per KV head, the query heads that share it standing in as rows:

    scores [q_len, group, S] = (q * scale) @ k[h]^T     causal only in the last q_len columns
    out    [q_len, group, D] = softmax(scores) @ v[h]

Why not SDPA: its fused CPU kernel multiplies through the BLAS `F.linear` uses, which on this
project's CPUs (AMD EPYC, AVX-512) runs these products at about half the speed of oneDNN's
matmul (measured: 65 queries of 12 heads on 1,940 keys, 2.8 ms by SDPA, 1.35 ms this way). oneDNN
takes the products only over contiguous matrices (a key matrix strided by the paged pool's
[slot, Hkv, D] layout sends it down a path three orders of magnitude slower), which is what the
mirror's layout gives. The scores are materialised, so this way serves chunks whose scores stay
small (SCORES_BUDGET_BYTES per KV head); a longer chunk (a first prefill of a document) goes to
SDPA over the same head-major keys, flash-style, without materialising them.

Work is (new queries x keys) and nothing larger: the keys are read where they are, the KV heads
are not repeated, and only the last q_len columns get a mask (row_attention_mask, built once a
step by the caller).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.paged_attention_ref import chunk_mask

SCORES_BUDGET_BYTES = 4 << 20  # per KV head; 65 queries x 3 heads x 5,000 keys x 4 bytes fit


def _onednn_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_ONEDNN = _onednn_linear_available()


def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight^T (weight [out, in], contiguous or the transpose of a contiguous matrix):
    oneDNN's matmul for float32 on the CPU, else F.linear."""
    if _ONEDNN and x.dtype == torch.float32 and x.device.type == "cpu":
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)


def uses_products(q_len: int, group: int, num_keys: int) -> bool:
    """Whether row_attention multiplies (the scores fit the budget) or runs SDPA."""
    return q_len * group * num_keys * 4 <= SCORES_BUDGET_BYTES


def row_attention_mask(
    q_len: int, num_keys: int, group: int, device: torch.device
) -> torch.Tensor | None:
    """The additive float32 mask row_attention takes for a chunk of q_len queries over num_keys
    keys (built once a step, read by every layer): for the products, [q_len, 1, q_len] added to
    the scores' last q_len columns (query j may not see the chunk's keys past its own); for SDPA,
    kernels/paged_attention_ref.py's chunk_mask. None where none is needed (a single query; a
    first prefill, which takes SDPA's own causal mask)."""
    if not uses_products(q_len, group, num_keys):
        return chunk_mask(q_len, num_keys, device)
    if q_len == 1:
        return None
    return torch.full((q_len, q_len), float("-inf"), device=device).triu_(1).unsqueeze(1)


def row_attention(
    q: torch.Tensor,  # [q_len, Hq, D], the sequence's last q_len positions
    k: torch.Tensor,  # [Hkv, S, D], each head's [S, D] contiguous; keys 0..S-1
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None,  # row_attention_mask(q_len, S, Hq // Hkv)
) -> torch.Tensor:
    """Causal attention of the new queries over all S keys (query j sits at position
    S - q_len + j). float32 accumulation; returns [q_len, Hq, D] in q's dtype."""
    q_len, num_heads, head_dim = q.shape
    num_kv_heads, num_keys, _ = k.shape
    group = num_heads // num_kv_heads
    if not uses_products(q_len, group, num_keys):
        return _flash_attention(q, k, v, scale, mask)
    # [Hkv, q_len, group, D]: each KV head's queries one contiguous block, scaled once.
    qs = (q.float() * scale).view(q_len, num_kv_heads, group, head_dim).transpose(0, 1)
    qs = qs.contiguous()
    out = torch.empty(q_len, num_kv_heads, group, head_dim, dtype=torch.float32, device=q.device)
    for h in range(num_kv_heads):
        scores = _product(qs[h], k[h].float())  # [q_len, group, S]
        if mask is not None:
            scores[:, :, num_keys - q_len :] += mask
        probs = torch.softmax(scores, dim=-1)
        out[:, h] = _product(probs, v[h].float().T)  # [q_len, group, D]
    return out.view(q_len, num_heads, head_dim).to(q.dtype)


def _flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None
) -> torch.Tensor:
    """SDPA's fused kernel over the head-major keys: a long chunk, whose scores would be big."""
    q_len, num_keys = q.shape[0], k.shape[1]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0).float(),  # [1, Hq, q_len, D]
        k.unsqueeze(0).float(),  # [1, Hkv, S, D]
        v.unsqueeze(0).float(),
        attn_mask=mask,
        is_causal=q_len > 1 and q_len == num_keys,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[0],
    )
    return out[0].transpose(0, 1).to(q.dtype)
