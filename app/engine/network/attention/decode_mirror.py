"""CPU decode steps: the batch's keys and values kept contiguous from one step to the next.

A step of decodes on the CPU attends in one batched call over every sequence's keys, padded to
the longest. Gathering them out of the paged pool anew in every layer of every step copies the
whole history of the batch, and attention then reads that copy through a transpose. While the
batch stays the same (the same sequences in the same order, each one token longer than in the
step before), the mirror instead keeps, per layer, one contiguous copy

    keys, values: [B, Hkv, capacity, D]     row b = the b-th sequence of the batch, by position

and appends each step's new key and value to it (read back from the pool, where store_kv has just
written them). Any other step (a sequence joins, leaves, prefills, or outgrows the capacity)
starts over: the first layer call of that step refills every row from the pool.

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
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A refill step: this layer's mirror rows become `keys`/`values` [B, Hkv, >= num_keys,
        D], every row's blocks gathered from the pool; returns its keys and values for the
        step, [B, Hkv, num_keys, D] each."""
        out = []
        for gathered, buffer in zip((keys, values), self._buffers(layer), strict=True):
            buffer[:, :, : gathered.shape[2]].copy_(gathered)
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
        fresh allocation would fault in its pages at every refill)."""
        _, _, num_kv_heads, head_dim = like.shape
        size = batch * num_kv_heads * capacity * head_dim
        storage = self._storage[layer]
        if storage is None or storage.shape[1] < size or storage.dtype != like.dtype:
            storage = torch.zeros(2, size, dtype=like.dtype, device=like.device)
            self._storage[layer] = storage
        shape = (batch, num_kv_heads, capacity, head_dim)
        return storage[0, :size].view(shape), storage[1, :size].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._storage if s is not None)
