"""A fixed pool of KV blocks, as plain ints: reference counts, content hashes, an LRU free queue.

    block:    ref_count > 0  used: in the block tables of ref_count threads
              ref_count == 0 free: in the free queue; with a hash it is still *cached* (its KV
                             is intact and `lookup` finds it) until an allocation reuses it

Blocks are handed out from the head of the free queue and returned to its tail, so a freed block
(and the cached KV it may hold) is reused as late as possible, and tests can predict exact block
ids. The queue is an OrderedDict: taking a cached block back out of it (`acquire`) is O(1).

A table that grows asks for its blocks `after` its last one: the next block in the pool, when it
is free and holds no cached KV, continues the table in place (so attention reads the history as
one view of the pool instead of gathering it in every layer). A block that must start a new run
skips the `claims` (the room kept after other growing tables, see KVCacheManager) and is the
first free block in the queue outside them:

    pool:   A A A . . . . B B B . . . . . .     A and B in flight, each claiming 4 blocks after it
    claims:       [ A's ]       [ B's ]
    A grows into 3, 4, ...; a new table C starts at 14, the first free block outside both claims

Only full blocks get a hash (`register`); a block with a hash is never written again, which is
why a thread may share it. A hash names at most one block: a second block computed with the
same contents stays unregistered (and private to its thread).

Every allocation bumps the block's generation (`generations`): the KV a block held stays the same
as long as its id and generation do (its holder only ever writes past what it had computed), so a
copy of it kept elsewhere (the CPU attention's mirror) can tell whether it is still current.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from app.kvcache.block_hash import BlockHash


class BlockPoolExhausted(RuntimeError):
    """An allocation asked for more blocks than the free queue holds."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._ref = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        self._by_hash: dict[BlockHash, int] = {}
        self.generations = [0] * num_blocks  # per block: allocations so far (read, not written)
        self.num_cache_evictions = 0  # cached free blocks reused for other KV

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_free(self) -> int:
        """Free blocks whose KV is still findable by hash."""
        return sum(1 for b in self._free if self._hash[b] is not None)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def free_block_ids(self) -> list[int]:
        """The free queue, head first (the next allocation takes from the head)."""
        return list(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._hash[block_id]

    def is_private(self, block_id: int) -> bool:
        """One holder and no hash: the holder may write into it."""
        return self._ref[block_id] == 1 and self._hash[block_id] is None

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._by_hash.get(block_hash)

    def allocate(
        self,
        num: int,
        *,
        after: int | None = None,
        claims: Sequence[tuple[int, int]] = (),
    ) -> list[int]:
        """num blocks, each with one holder and no hash. Without `after` and `claims`, from the
        head of the free queue. With `after` (the last block of the table they extend), each
        block is the one right after the block before it when that one is free and holds no
        cached KV; any other block is the first of the free queue outside the `claims`
        (half-open ranges [start, stop) of block ids), or its head when every free block is
        claimed."""
        if num > len(self._free):
            raise BlockPoolExhausted(f"asked for {num} blocks, {len(self._free)} free")
        blocks = []
        prev = after
        for _ in range(num):
            nxt = -1 if prev is None else prev + 1
            if 0 <= nxt < self.num_blocks and nxt in self._free and self._hash[nxt] is None:
                block_id = nxt
                del self._free[block_id]
            elif claims:
                block_id = self._first_unclaimed(claims)
                del self._free[block_id]
            else:
                block_id, _ = self._free.popitem(last=False)
            if self._hash[block_id] is not None:
                self.unregister(block_id)
                self.num_cache_evictions += 1
            self._ref[block_id] = 1
            self.generations[block_id] += 1
            blocks.append(block_id)
            prev = block_id
        return blocks

    def _first_unclaimed(self, claims: Sequence[tuple[int, int]]) -> int:
        """The first free block in queue order outside every claim (the head if none is). The
        scan ends after as many blocks as the claims cover: past them one must be unclaimed."""
        limit = sum(stop - start for start, stop in claims) + 1
        for count, block_id in enumerate(self._free):
            if not any(start <= block_id < stop for start, stop in claims):
                return block_id
            if count >= limit:
                break
        return next(iter(self._free))

    def acquire(self, block_id: int) -> None:
        """One more holder of a used block, or a cached free block taken back into use."""
        if self._ref[block_id] == 0:
            if self._hash[block_id] is None:
                raise RuntimeError(f"block {block_id} is free and holds no cached KV")
            del self._free[block_id]
        self._ref[block_id] += 1

    def free(self, blocks: Iterable[int]) -> None:
        """One holder fewer for each block; a block nobody holds goes to the free queue's tail."""
        for block_id in blocks:
            if self._ref[block_id] == 0:
                raise RuntimeError(f"block {block_id} freed twice")
            self._ref[block_id] -= 1
            if self._ref[block_id] == 0:
                self._free[block_id] = None

    def register(self, block_id: int, block_hash: BlockHash) -> bool:
        """Give a used, full block its content hash. False if the hash already names another
        block (the caller keeps its copy private) or the block already has one."""
        if self._ref[block_id] == 0:
            raise RuntimeError(f"block {block_id} is free")
        if block_hash in self._by_hash or self._hash[block_id] is not None:
            return False
        self._hash[block_id] = block_hash
        self._by_hash[block_hash] = block_id
        return True

    def unregister(self, block_id: int) -> None:
        block_hash = self._hash[block_id]
        if block_hash is not None:
            del self._by_hash[block_hash]
            self._hash[block_id] = None

    def check_integrity(self) -> None:
        """free + used == total; free blocks have no holder; hashes and the index agree."""
        for block_id in self._free:
            assert self._ref[block_id] == 0, f"free block {block_id} has holders"
        used = sum(1 for r in self._ref if r > 0)
        assert all(r >= 0 for r in self._ref), "a negative reference count"
        assert len(self._free) + used == self.num_blocks, (
            f"free {len(self._free)} + used {used} != total {self.num_blocks}"
        )
        for block_hash, block_id in self._by_hash.items():
            assert self._hash[block_id] == block_hash, f"index and block {block_id} disagree"
        assert sum(h is not None for h in self._hash) == len(self._by_hash)
