"""Copies of KV blocks between the device pool and host memory (the host tier's rows).

    device pool: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]
    host rows:   [num_slots, num_layers, 2, block_size, num_kv_heads, head_dim]   one row a block

A host row holds one whole block contiguously (the disk tier's files hold the same layout), so a
block moves with one contiguous copy. The bookkeeping (which slot holds which block, budgets,
LRU) is app/kvcache/tiers.py; this module only moves bytes.

On CUDA the rows are pinned memory and the copies run on a side stream: the side stream first
waits for the compute stream (the KV it copies is written), and the compute stream then waits for
the copy's event (a device block given away is rewritten only after its KV left). All host-tier
copies go through the one side stream, so they are ordered among themselves (a row freed by a
restore is overwritten only after the restore read it); the CPU reads a row (for the disk tier)
only after `sync()`. On the CPU both sides are RAM and a copy is a plain indexed copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.engine.network.kv_pool import KVPool


def block_shape(pool: KVPool) -> tuple[int, ...]:
    """The shape of one block's KV, all layers: [num_layers, 2, block_size, heads, head_dim]."""
    num_layers, two, _, block_size, heads, head_dim = pool.tensor.shape
    return (num_layers, two, block_size, heads, head_dim)


def gather_blocks(pool: KVPool, blocks: Sequence[int]) -> torch.Tensor:
    """A CPU copy of the given device blocks: [len(blocks), *block_shape] (synchronous)."""
    if not blocks:
        return torch.empty((0, *block_shape(pool)), dtype=pool.tensor.dtype)
    index = torch.tensor(list(blocks), device=pool.tensor.device)
    rows = pool.tensor.index_select(2, index).permute(2, 0, 1, 3, 4, 5)
    return rows.contiguous().cpu()


def scatter_blocks(pool: KVPool, blocks: Sequence[int], rows: torch.Tensor) -> None:
    """Write CPU rows [len(blocks), *block_shape] into the given device blocks.

    One copy per block: no intermediate tensor of the whole set (on the CPU, allocating one
    costs its page faults, and an indexed copy from a permuted source runs element by
    element; both measured several times slower than this loop)."""
    if not blocks:
        return
    rows = rows.to(pool.tensor.device)
    for j, block in enumerate(blocks):
        pool.tensor[:, :, block].copy_(rows[j])


class HostKVRows:
    """The host tier's memory: `num_slots` rows of one block each, allocated once."""

    def __init__(self, pool: KVPool, num_slots: int) -> None:
        self.pool = pool
        self.device = pool.tensor.device
        self.is_cuda = self.device.type == "cuda"
        # empty, not zeros: on the CPU untouched pages cost no memory until a block lands there.
        self.tensor = torch.empty(
            (num_slots, *block_shape(pool)), dtype=pool.tensor.dtype, pin_memory=self.is_cuda
        )
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None
        self._last_copy: torch.cuda.Event | None = None

    @property
    def bytes_per_row(self) -> int:
        return self.tensor[0].numel() * self.tensor.element_size() if len(self.tensor) else 0

    def offload(self, blocks: Sequence[int], slots: Sequence[int]) -> None:
        """Device blocks -> host rows (blocks[i] into slots[i])."""
        if not blocks:
            return
        if self.stream is None:  # the CPU: block by block, no intermediate (scatter_blocks)
            for block, slot in zip(blocks, slots, strict=True):
                self.tensor[slot].copy_(self.pool.tensor[:, :, block])
            return
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)  # the KV to copy is written
        with torch.cuda.stream(self.stream):
            index = torch.tensor(list(blocks), device=self.device)
            staged = self.pool.tensor.index_select(2, index).permute(2, 0, 1, 3, 4, 5).contiguous()
            for j, slot in enumerate(slots):
                self.tensor[slot].copy_(staged[j], non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        main.wait_event(event)  # the blocks given away are rewritten only after the copy
        self._last_copy = event

    def restore(self, slots: Sequence[int], blocks: Sequence[int]) -> None:
        """Host rows -> device blocks (slots[i] into blocks[i])."""
        if not blocks:
            return
        if self.stream is None:
            for slot, block in zip(slots, blocks, strict=True):
                self.pool.tensor[:, :, block].copy_(self.tensor[slot])
            return
        main = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(main)  # earlier readers of these (fresh) blocks are done
        with torch.cuda.stream(self.stream):
            staged = torch.empty((len(slots), *self.tensor.shape[1:]), dtype=self.tensor.dtype,
                                 device=self.device)  # fmt: skip
            for j, slot in enumerate(slots):
                staged[j].copy_(self.tensor[slot], non_blocking=True)
            index = torch.tensor(list(blocks), device=self.device)
            self.pool.tensor.index_copy_(2, index, staged.permute(1, 2, 0, 3, 4, 5))
            event = torch.cuda.Event()
            event.record(self.stream)
        main.wait_event(event)  # the next forward pass reads the restored blocks after this
        self._last_copy = event

    def read(self, slots: Sequence[int]) -> torch.Tensor:
        """A CPU copy of host rows (for the disk tier): [len(slots), *block_shape]."""
        self.sync()
        if not slots:
            return self.tensor[:0].clone()
        return self.tensor.index_select(0, torch.tensor(list(slots)))

    def sync(self) -> None:
        """Wait for the copies queued on the side stream (CUDA); a no-op on the CPU."""
        if self._last_copy is not None:
            self._last_copy.synchronize()
            self._last_copy = None
