"""The pure-torch backend: the CPU (and any device without a backend of its own).

Stores with kernels/store_kv_ref.py. Attends, per step, by one of three paths, chosen in
`prepare` (the decode policy):

    a step of decodes (one query per sequence), padded to the longest table no more than twice
    the real keys:
        the decode mirror (decode_mirror.py): the batch's keys kept contiguous across steps,
        appended to, refilled when the batch changes          -> decode_attention
        or, past the mirror's memory budget, every sequence's blocks gathered and padded
                                                               -> padded_decode_attention
    anything else (prefills, chunks, a long thread among short ones, where padding reads more):
        kernels/paged_attention_ref.py's loop over sequences itself, whose shapes are already
        those SDPA's fused CPU kernel takes
"""

from __future__ import annotations

import torch

from app.engine.network.attention.base import AttentionBackend, AttentionMetadata, KVCaches
from app.engine.network.attention.decode_mirror import DecodeMirror, MirrorStep
from kernels.paged_attention_ref import chunk_masks, paged_attention_ref
from kernels.store_kv_ref import store_kv_ref


class CPUBackend(AttentionBackend):
    """Keeps the step's host lists and decode extras, and the decode mirror across steps."""

    def __init__(self, kv_caches: KVCaches) -> None:
        self._like = kv_caches[0][0]  # a layer's cache: dtype, device, block size, Hkv, D
        self.block_size = self._like.shape[1]
        # At most the pool's own size: the decode batch's keys, padded, plus headroom.
        pool_bytes = sum(t.numel() * t.element_size() for pair in kv_caches for t in pair)
        self.decode_mirror = DecodeMirror(len(kv_caches), max_bytes=pool_bytes)
        # This step's: the metadata's values on the host, and the decode path's extras.
        self._cu_seqlens_q: list[int] = [0]
        self._seq_lens: list[int] = []
        self.mirror_step: MirrorStep | None = None  # a decode step through the mirror
        self._decode_blocks: torch.Tensor | None = None  # [B, M] int64, a decode step
        self._decode_mask: torch.Tensor | None = None  # [B, 1, 1, keys] float32, 0 or -inf
        # Any other step: each chunk's additive mask, built once for every layer.
        self._chunk_masks: list[torch.Tensor | None] | None = None

    def prepare(
        self,
        meta: AttentionMetadata,
        *,
        seq_ids: tuple[int, ...],
        cu_seqlens_q: list[int],
        seq_lens: list[int],
    ) -> None:
        self._cu_seqlens_q, self._seq_lens = cu_seqlens_q, seq_lens
        self.mirror_step = self._decode_blocks = self._decode_mask = self._chunk_masks = None
        # Decodes only: one padded attention for the batch, unless padding to the longest table
        # would read more than twice the real keys (one long thread among short ones); then the
        # per-sequence loop reads less memory. The mirror keeps the padded keys from step to
        # step; past its memory budget they are gathered from the pool every step.
        bs = self.block_size
        max_blocks = meta.block_tables.shape[1]
        if meta.max_seqlen_q != 1 or len(seq_lens) * max_blocks * bs > 2 * sum(seq_lens):
            self.decode_mirror.reset()
            self._chunk_masks = chunk_masks(cu_seqlens_q, seq_lens, self._like.device)
            return
        self._decode_blocks = meta.block_tables.long()
        self.mirror_step = self.decode_mirror.begin_step(
            seq_ids, seq_lens, meta.slot_mapping, bs, self._like
        )
        num_keys = max_blocks * bs if self.mirror_step is None else self.mirror_step.num_keys
        self._decode_mask = decode_key_mask(meta.seq_lens, num_keys)

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        store_kv_ref(key, value, k_cache, v_cache, meta.slot_mapping)

    def forward(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        layer: int,
    ) -> torch.Tensor:
        blocks, mask, step = self._decode_blocks, self._decode_mask, self.mirror_step
        if blocks is None or mask is None:  # not a step of decodes
            return paged_attention_ref(
                q,
                k_cache,
                v_cache,
                meta.block_tables,
                self._cu_seqlens_q,
                self._seq_lens,
                scale,
                masks=self._chunk_masks,
            )
        if step is None:
            return padded_decode_attention(q, k_cache, v_cache, blocks, mask, scale)
        if step.refill:
            k, v = step.refill_layer(layer, k_cache, v_cache, blocks)
        else:
            k, v = step.append_layer(layer, k_cache, v_cache)
        return decode_attention(q, k, v, mask, scale)

    def finish_step(self) -> None:
        if self.mirror_step is not None:
            self.decode_mirror.commit()


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
