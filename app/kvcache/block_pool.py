"""A fixed pool of KV blocks, as plain ints: a FIFO free list and the owner of every used block.

Blocks are handed out from the head of the free list and returned to its tail, so a freed block
is reused as late as possible (and tests can predict exact block ids). Without shared prefixes a
block has exactly one owner (a thread key), so an owner slot stands in for a reference count.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable


class BlockPoolExhausted(RuntimeError):
    """An allocation asked for more blocks than the free list holds."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: list[Hashable | None] = [None] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def free_block_ids(self) -> list[int]:
        """The free list, head first (the next allocation takes from the head)."""
        return list(self._free)

    def owner(self, block_id: int) -> Hashable | None:
        return self._owner[block_id]

    def allocate(self, num: int, owner: Hashable) -> list[int]:
        if owner is None:
            raise ValueError("a block's owner cannot be None (None marks a free block)")
        if num > len(self._free):
            raise BlockPoolExhausted(f"asked for {num} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(num)]
        for block_id in blocks:
            self._owner[block_id] = owner
        return blocks

    def free(self, blocks: Iterable[int]) -> None:
        for block_id in blocks:
            if self._owner[block_id] is None:
                raise RuntimeError(f"block {block_id} freed twice")
            self._owner[block_id] = None
            self._free.append(block_id)

    def check_integrity(self) -> None:
        """free + used == total, and no block is both free and owned, or free twice."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block sits twice in the free list"
        used = {b for b, owner in enumerate(self._owner) if owner is not None}
        assert not free & used, f"blocks both free and owned: {sorted(free & used)}"
        assert len(free) + len(used) == self.num_blocks, (
            f"free {len(free)} + used {len(used)} != total {self.num_blocks}"
        )
