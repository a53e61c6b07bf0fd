"""The pure-torch backend: the CPU (and any device without a backend of its own).

Stores with kernels/store_kv_ref.py. Attends, per step, by one of three paths, chosen in
`prepare`:

    the engine's steps (it says whose KV each sequence is, `owners`), within the mirror's memory:
        the thread mirror (thread_mirror.py) brings every row of the step up to date, copying
        only what it lacks (the step's new tokens, for a thread it already holds); with the C++
        library (float32) the pool's new tokens and the rows' copies are one call per layer
        (kernels/cpu_decode_attention.py `store_and_sync`, in forward: store_kv keeps them),
        else store_kv_ref and MirrorStep.sync_layer; then
            decodes (float32): each reads its own row's keys     -> kernels/cpu_decode_attention
            (a step of decodes only: the runner's fused layers do the writes and attention of
            every layer in one call instead, network/fused_decode.py, `fused_decode_step`)
            a step of decodes otherwise: one batched product over the rows -> decode_attention
            (unless padding to the longest would read more than twice the real keys)
            a turn's new tokens: per sequence, over its head-major row -> row_attention.py
    a step of decodes otherwise, padded to the longest table no more than twice the real keys:
        every sequence's blocks gathered and padded                -> padded_decode_attention
    anything else (and callers that do not say whose the KV is):
        kernels/paged_attention_ref.py's loop over sequences itself, whose shapes are already
        those SDPA's fused CPU kernel takes
"""

from __future__ import annotations

import torch

from app.engine.network.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    KVCaches,
    StepOwners,
)
from app.engine.network.attention.row_attention import row_attention, row_attention_mask
from app.engine.network.attention.thread_mirror import MirrorStep, ThreadMirror
from kernels.cpu_decode_attention import (
    DecodeAttentionKernel,
    DecodeRows,
    StepWrites,
    load_decode_attention,
)
from kernels.paged_attention_ref import chunk_masks, paged_attention_ref
from kernels.store_kv_ref import store_kv_ref


class CPUBackend(AttentionBackend):
    """Keeps the step's host lists and extras, and the thread mirror across steps."""

    def __init__(self, kv_caches: KVCaches, *, native_decode: bool = True) -> None:
        self._like = kv_caches[0][0]  # a layer's cache: dtype, device, block size, Hkv, D
        self.block_size = self._like.shape[1]
        # The C++ library (float32 on the CPU, where it builds): a mirror step's writes (the
        # pool's new tokens, the rows' missing positions) in one call per layer; and decodes
        # reading their rows, where it is built for the head size. None: torch's operations.
        self.native: DecodeAttentionKernel | None = None
        if native_decode and self._like.device.type == "cpu" and self._like.dtype == torch.float32:
            self.native = load_decode_attention()
        self.decode_kernel: DecodeAttentionKernel | None = None
        if self.native is not None and self.native.supports(self._like.shape[-1]):
            self.decode_kernel = self.native
        # store_and_sync writes the pool by slot offsets: every layer's pool contiguous.
        self._writes_natively = self.native is not None and all(
            t.is_contiguous() for pair in kv_caches for t in pair
        )
        # At most the pool's own size: the running threads' keys, with headroom.
        pool_bytes = sum(t.numel() * t.element_size() for pair in kv_caches for t in pair)
        self.mirror = ThreadMirror(len(kv_caches), max_bytes=pool_bytes)
        # This step's: the metadata's values on the host, and the chosen path's extras.
        self._cu_seqlens_q: list[int] = [0]
        self._seq_lens: list[int] = []
        self.mirror_step: MirrorStep | None = None  # a step through the mirror
        self._row_index: torch.Tensor | None = None  # [B] int64, each sequence's row
        self._num_keys = 0  # a decode step through the mirror: keys read per row
        # Decodes through the mirror by the kernel: their rows and lengths, and (a step that
        # also has prefill chunks) their positions in the step's queries.
        self._native_rows: DecodeRows | None = None
        self._native_index: torch.Tensor | None = None
        # A mirror step's writes by the library: what to write, and the layer's new keys and
        # values, kept by store_kv for forward (which knows the layer).
        self._writes: StepWrites | None = None
        self._new_kv: tuple[torch.Tensor, torch.Tensor] | None = None
        # A chunk step: per sequence, its row_attention_mask (built by the first layer, which
        # knows the query heads).
        self._row_masks: list[torch.Tensor | None] | None = None
        self._decode_blocks: torch.Tensor | None = None  # [B, M] int64, a gathered decode step
        self._decode_mask: torch.Tensor | None = None  # [rows, 1, 1, keys] float32, 0 or -inf
        # A step through the pool's own loop: each chunk's additive mask, built once.
        self._chunk_masks: list[torch.Tensor | None] | None = None

    def prepare(
        self,
        meta: AttentionMetadata,
        *,
        seq_ids: tuple[int, ...],
        cu_seqlens_q: list[int],
        seq_lens: list[int],
        owners: StepOwners | None = None,
    ) -> None:
        self._cu_seqlens_q, self._seq_lens = cu_seqlens_q, seq_lens
        self.mirror_step = self._row_index = self._decode_blocks = self._decode_mask = None
        self._chunk_masks = self._row_masks = self._native_rows = self._native_index = None
        self._writes = self._new_kv = None
        decodes_only = meta.max_seqlen_q == 1
        if owners is not None and self._prepare_mirror(owners, meta.slot_mapping, decodes_only):
            return
        # Decodes only: one padded attention for the batch, unless padding to the longest table
        # would read more than twice the real keys (one long thread among short ones); then the
        # per-sequence loop reads less memory.
        bs = self.block_size
        max_blocks = meta.block_tables.shape[1]
        if not decodes_only or len(seq_lens) * max_blocks * bs > 2 * sum(seq_lens):
            self._chunk_masks = chunk_masks(cu_seqlens_q, seq_lens, self._like.device)
            return
        self._decode_blocks = meta.block_tables.long()
        self._decode_mask = decode_key_mask(meta.seq_lens, max_blocks * bs)

    def _prepare_mirror(
        self, owners: StepOwners, slot_mapping: torch.Tensor, decodes_only: bool
    ) -> bool:
        """Plan the step through the mirror; False when it does not fit there."""
        cu, lens = self._cu_seqlens_q, self._seq_lens
        cached = [lens[b] - (cu[b + 1] - cu[b]) for b in range(len(lens))]
        step = self.mirror.begin_step(
            owners.thread_keys,
            owners.block_tables,
            cached,
            lens,
            self.block_size,
            owners.block_generations,
            self._like,
        )
        if step is None:
            return False
        self.mirror_step = step
        device = self._like.device
        if self._writes_natively:
            num_rows, _, capacity, _ = self.mirror.layer(0)[0].shape
            self._writes = StepWrites(
                slot_mapping,
                step.copy_rows,
                step.copy_positions,
                step.copy_slots,
                num_slots=self._like.shape[0] * self._like.shape[1],
                num_rows=num_rows,
                capacity=capacity,
            )
        if self.decode_kernel is not None:
            decodes = [b for b in range(len(lens)) if cu[b + 1] - cu[b] == 1]
            if decodes:
                self._native_rows = DecodeRows(
                    [step.rows[b] for b in decodes], [lens[b] for b in decodes]
                )
            if not decodes_only and decodes:
                positions = [cu[b] for b in decodes]
                self._native_index = torch.tensor(positions, dtype=torch.int64, device=device)
            if decodes_only:
                return True
        # Decodes in one batched product read every row in the step's range up to the longest:
        # unless that is more than twice the real keys (one long thread among short ones, or
        # rows of other threads between them), where each sequence reads its own row instead.
        span = step.end_row - step.first_row
        if decodes_only and span * max(lens) <= 2 * sum(lens):
            # Rows of threads not in the step (between the step's rows) see one key, and their
            # output is dropped: a softmax over no key at all would be NaN.
            row_lens = [1] * span
            for row, seq_len in zip(step.rows, lens, strict=True):
                row_lens[row - step.first_row] = seq_len
            self._num_keys = max(lens)
            self._decode_mask = decode_key_mask(
                torch.tensor(row_lens, dtype=torch.int64, device=device), self._num_keys
            )
            if not step.in_order:
                offsets = [row - step.first_row for row in step.rows]
                self._row_index = torch.tensor(offsets, dtype=torch.int64, device=device)
        return True

    def fused_decode_step(self) -> tuple[DecodeRows, StepWrites] | None:
        """This step for the fused decode layers (kernels/cpu_decode_layers.py), which do the
        whole step's writes and attention themselves: a step of decodes only through the mirror,
        with the library writing the pool and attending. None for any other step."""
        if self._native_rows is None or self._native_index is not None or self._writes is None:
            return None
        return self._native_rows, self._writes

    def store_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> None:
        if self._writes is not None:  # written with the mirror's rows, in forward
            self._new_kv = (key, value)
            return
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
        step = self.mirror_step
        if step is not None:
            if self._writes is not None and self.native is not None:
                keys, values = self.mirror.layer(layer)  # [R, Hkv, capacity, D]
                new_key, new_value = self._new_kv or (None, None)
                self._new_kv = None
                self.native.store_and_sync(
                    new_key, new_value, k_cache, v_cache, self._writes, keys, values
                )
            else:
                keys, values = step.sync_layer(layer, k_cache, v_cache)
            if self._native_rows is not None and self._native_index is None:  # decodes only
                assert self.decode_kernel is not None
                return self.decode_kernel(q, keys, values, self._native_rows, scale)
            if self._decode_mask is not None:
                return self._mirror_decodes(q, keys, values, scale)
            return self._mirror_chunks(q, keys, values, scale)
        if self._decode_blocks is not None and self._decode_mask is not None:
            return padded_decode_attention(
                q, k_cache, v_cache, self._decode_blocks, self._decode_mask, scale
            )
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

    def _mirror_decodes(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """A step of decodes over the step's range of the mirror's rows: one batched product.
        Rows in the step's order are read as they stand; otherwise the queries go to their rows
        (other threads' rows between them get zero queries) and the outputs come back."""
        step = self.mirror_step
        assert step is not None and self._decode_mask is not None
        rows, num_keys = slice(step.first_row, step.end_row), self._num_keys
        k = keys[rows, :, :num_keys]
        v = values[rows, :, :num_keys]
        if self._row_index is None:
            return decode_attention(q, k, v, self._decode_mask, scale)
        by_row = q.new_zeros(step.end_row - step.first_row, *q.shape[1:])
        by_row.index_copy_(0, self._row_index, q)
        out = decode_attention(by_row, k, v, self._decode_mask, scale)
        return out.index_select(0, self._row_index)

    def _mirror_chunks(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Any other step: each sequence's queries over its own row."""
        assert self.mirror_step is not None
        cu = self._cu_seqlens_q
        if self._row_masks is None:
            self._row_masks = self._build_row_masks(q.shape[1] // keys.shape[1], q.device)
        out = torch.empty_like(q)
        native = self._native_index is not None
        if native:  # the step's decodes, all at once
            assert self.decode_kernel is not None and self._native_rows is not None
            decoded = self.decode_kernel(
                q.index_select(0, self._native_index), keys, values, self._native_rows, scale
            )
            out.index_copy_(0, self._native_index, decoded)
        for b, (row, seq_len) in enumerate(zip(self.mirror_step.rows, self._seq_lens, strict=True)):
            start, end = cu[b], cu[b + 1]
            if start == end or (native and end - start == 1):
                continue
            if end - start == 1:  # a decode: one batched product over the row's KV heads
                out[start:end] = decode_attention(
                    q[start:end],
                    keys[row : row + 1, :, :seq_len],
                    values[row : row + 1, :, :seq_len],
                    None,
                    scale,
                )
                continue
            out[start:end] = row_attention(
                q[start:end],
                keys[row, :, :seq_len],
                values[row, :, :seq_len],
                scale,
                self._row_masks[b],
            )
        return out

    def _build_row_masks(self, group: int, device: torch.device) -> list[torch.Tensor | None]:
        """Every sequence's row_attention_mask for this step, one per distinct shape."""
        cu, built = self._cu_seqlens_q, {}
        masks = []
        for b, seq_len in enumerate(self._seq_lens):
            shape = (cu[b + 1] - cu[b], seq_len)
            if shape not in built:
                built[shape] = row_attention_mask(*shape, group, device)
            masks.append(built[shape])
        return masks

    def finish_step(self) -> None:
        if self.mirror_step is not None:
            self.mirror.commit()


def decode_key_mask(seq_lens: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[B, 1, 1, num_keys] additive float32 mask for decode_attention: 0 for the keys below each
    sequence's (or row's) length, -inf past it. Built once a step and added in every layer."""
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
    mask: torch.Tensor | None,  # [B, 1, 1, K] 0 or -inf; None: every key counts
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
    k = k.reshape(rows, num_keys, head_dim).float()  # views of the mirror's rows (or a gather)
    v = v.reshape(rows, num_keys, head_dim).float()
    scores = torch.bmm(qg, k.transpose(1, 2)).view(batch, num_heads, num_keys)
    if mask is not None:
        scores.add_(mask.view(batch, 1, num_keys))  # the mask broadcast over the heads, no copy
    probs = torch.softmax(scores, dim=-1).view(rows, group, num_keys)
    return torch.bmm(probs, v).view(batch, num_heads, head_dim).to(q.dtype)
