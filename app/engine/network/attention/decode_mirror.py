"""CPU decode steps: the batch's keys and values kept contiguous from one step to the next.

A step of decodes on the CPU attends in one batched call over every sequence's keys, padded to
the longest. Gathering them out of the paged pool anew in every layer of every step copies the
whole history of the batch, and attention then reads that copy through a transpose. While the
batch stays the same (the same sequences in the same order, each one token longer than in the
step before), the mirror instead keeps, per layer, one contiguous copy

    keys, values: [B, Hkv, capacity, D]     row b = the b-th sequence of the batch, by position

and appends each step's new key and value to it (read back from the pool, where store_kv has just
written them). Any other step (a sequence joins, leaves, prefills, or outgrows the capacity)
starts over: the first layer call of that step refills every row from the pool. A refill costs
about one copy of the batch's history and nothing more: the blocks go through one staging buffer
into storage kept across refills (grown by doubling), so no layer allocates, faults in or zeroes
memory (which made a refill of 4 rows of 2,000 tokens cost 3-4 appends instead of 1.3).

The pool stays the one source of truth. A step counts only once the forward pass finished
(`commit`): a pass that failed half way leaves some layers appended and others not, so the next
step refills. Positions past a sequence's length hold stale but finite values (the storage starts
zeroed), which the step's -inf mask hides.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HEADROOM_TOKENS = 128  # room to grow before a refill; a refill costs what every step used to


@dataclass(frozen=True)
class _BatchShape:
    seq_ids: tuple[int, ...]
    seq_lens: tuple[int, ...]
    capacity: int


@dataclass
class MirrorStep:
    """What the layers of one decode step need from the mirror."""

    mirror: DecodeMirror
    refill: bool
    capacity: int
    num_keys: int  # the longest sequence: keys [0, num_keys) are read, a mask hides the rest
    slots: torch.Tensor  # [B] int64, the pool slot of each row's new token (append)
    rows: torch.Tensor  # [B] int64, 0..B-1
    positions: torch.Tensor  # [B] int64, each row's new token position
    like: torch.Tensor  # a layer's pool [N, bs, Hkv, D]: the buffers' dtype, device, Hkv, D

    def refill_layer(
        self, layer: int, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A refill step: this layer's mirror rows become every row's blocks ([B, M] padded
        block tables), gathered from the pool; returns its keys and values for the step,
        [B, Hkv, num_keys, D] each. The blocks go through one staging buffer kept across
        layers and steps: no allocation (and no page faults) per layer."""
        batch, num_blocks = blocks.shape
        block_size = k_cache.shape[1]
        out = []
        for cache, buffer in zip((k_cache, v_cache), self._buffers(layer), strict=True):
            staged = self.mirror.staging(batch * num_blocks, cache)  # [B * M, bs, Hkv, D]
            torch.index_select(cache, 0, blocks.reshape(-1), out=staged)
            keys = staged.view(batch, num_blocks * block_size, *cache.shape[2:]).transpose(1, 2)
            buffer[:, :, : keys.shape[2]].copy_(keys)
            out.append(buffer[:, :, : self.num_keys])
        return out[0], out[1]

    def append_layer(
        self, layer: int, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """An append step: each row's new key and value read back from the pool (which already
        holds the step's new token) into this layer's mirror; returns its keys and values for
        the step, [B, Hkv, num_keys, D] each."""
        out = []
        for cache, buffer in zip((k_cache, v_cache), self._buffers(layer), strict=True):
            new = cache.flatten(0, 1).index_select(0, self.slots)  # [B, Hkv, D]
            buffer[self.rows, :, self.positions] = new
            out.append(buffer[:, :, : self.num_keys])
        return out[0], out[1]

    def _buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mirror.buffers(layer, self.rows.shape[0], self.capacity, self.like)


class DecodeMirror:
    """Per-layer contiguous keys/values of the current decode batch; owned by the model runner."""

    def __init__(self, num_layers: int, max_bytes: int) -> None:
        self.num_layers = num_layers
        self.max_bytes = max_bytes
        self._storage: list[torch.Tensor | None] = [None] * num_layers  # per layer: keys, values
        self._staging: torch.Tensor | None = None  # a refill's gathered blocks, one layer's K or V
        self._committed: _BatchShape | None = None
        self._pending: _BatchShape | None = None

    def begin_step(
        self,
        seq_ids: tuple[int, ...],
        seq_lens: list[int],
        slot_mapping: torch.Tensor,  # [B] int64, one new token per sequence
        block_size: int,
        like: torch.Tensor,  # a layer's cache: dtype, device, Hkv, D
    ) -> MirrorStep | None:
        """Plan a step of decodes: append when it continues the committed step, else refill.
        None when the batch would need more than max_bytes (the caller gathers instead)."""
        last, self._pending = self._committed, None
        self._committed = None  # until this step's forward pass finishes
        max_len = max(seq_lens)
        continues = (
            last is not None
            and last.seq_ids == seq_ids
            and max_len <= last.capacity
            and all(new == old + 1 for new, old in zip(seq_lens, last.seq_lens, strict=True))
        )
        if continues:
            capacity = last.capacity
        else:
            capacity = -(-(max_len + HEADROOM_TOKENS) // block_size) * block_size
            _, _, num_kv_heads, head_dim = like.shape
            per_layer = 2 * len(seq_ids) * num_kv_heads * capacity * head_dim
            if self.num_layers * per_layer * like.element_size() > self.max_bytes:
                return None
        self._pending = _BatchShape(seq_ids, tuple(seq_lens), capacity)
        lens = torch.tensor(seq_lens, dtype=torch.int64)
        return MirrorStep(
            mirror=self,
            refill=not continues,
            capacity=capacity,
            num_keys=max_len,
            slots=slot_mapping,
            rows=torch.arange(len(seq_ids)),
            positions=lens - 1,
            like=like,
        )

    def commit(self) -> None:
        """The planned step's forward pass finished: the next step may append to it."""
        self._committed, self._pending = self._pending, None

    def reset(self) -> None:
        """A step that did not go through the mirror: the next decode step refills."""
        self._committed = self._pending = None

    def buffers(
        self, layer: int, batch: int, capacity: int, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, Hkv, capacity, D] views for keys and values, on storage kept across refills (a
        fresh allocation would fault in its pages, and zero them, at every refill). Storage
        that is too small grows to at least twice its size, within the budget, so a history
        that grows turn after turn does not reallocate at every refill."""
        _, _, num_kv_heads, head_dim = like.shape
        size = batch * num_kv_heads * capacity * head_dim
        storage = self._storage[layer]
        if storage is None or storage.shape[1] < size or storage.dtype != like.dtype:
            budget = self.max_bytes // (self.num_layers * 2 * like.element_size())
            old = 0 if storage is None or storage.dtype != like.dtype else storage.shape[1]
            self._storage[layer] = None  # let the old storage go before the new one is made
            storage = torch.zeros(
                2, max(size, min(2 * old, budget)), dtype=like.dtype, device=like.device
            )
            self._storage[layer] = storage
        shape = (batch, num_kv_heads, capacity, head_dim)
        return storage[0, :size].view(shape), storage[1, :size].view(shape)

    def staging(self, num_blocks: int, like: torch.Tensor) -> torch.Tensor:
        """[num_blocks, bs, Hkv, D] of one buffer shared by every layer's refill (grown when a
        refill needs more; a layer's keys, then its values, pass through it)."""
        shape = (num_blocks, *like.shape[1:])
        size = num_blocks * like[0].numel()
        if (
            self._staging is None
            or self._staging.numel() < size
            or self._staging.dtype != like.dtype
        ):
            self._staging = None
            self._staging = torch.empty(2 * size, dtype=like.dtype, device=like.device)
        return self._staging[:size].view(shape)

    @property
    def nbytes(self) -> int:
        held = [*self._storage, self._staging]
        return sum(s.numel() * s.element_size() for s in held if s is not None)
