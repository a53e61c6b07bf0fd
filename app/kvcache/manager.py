"""Per-thread KV residency over the block pool: reuse, pinning, LRU eviction, rollback.

Each thread that holds KV has one `ThreadCache`: its block table and the exact token ids whose
KV those blocks hold. A turn goes through

    begin_turn(key, prompt_ids)   pin; keep the longest resident prefix of prompt_ids, free the rest
    ensure_blocks(key, n) ...     grow the block table as the turn computes (evicting LRU threads)
    finish_turn(key, ids)         the ids whose KV is now held (prompt + generated[:-1])
    release(key, keep_tokens)     unpin, optionally truncate (a rollback), mark recently used

A pinned thread is never evicted. Unpinned threads with blocks sit in an LRU (an OrderedDict,
least recently used first) and are evicted whole when an allocation needs room. `drop_blocks`
takes a pinned thread's blocks back (preemption): its turn recomputes from scratch.

The block table of a thread is one list, handed to the turn's Sequence by `begin_turn`; the
manager appends to it while the turn runs and only shortens it when a turn begins, is preempted,
or is released.

    block_table:  [ 7 | 2 | 9 ]        block_size 4, 10 tokens held: blocks_for(10) = 3
    token_ids:    t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 . .
    truncate(5):  [ 7 | 2 ]            block 9 freed; t5.. of block 2 are stale, overwritten later

Shared prefixes across threads (one block, several owners) are not supported yet: every block
has exactly one owner.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from app.kvcache.block_pool import BlockPool
from app.kvcache.miss_reason import MissReason
from app.kvcache.stats import KVCacheStats, ThreadCacheState


class ThreadInFlight(RuntimeError):
    """The thread already has a turn in flight (or one awaiting commit/rollback)."""


@dataclass
class ThreadCache:
    key: Hashable
    token_ids: list[int] = field(default_factory=list)  # ids whose KV the blocks hold
    block_table: list[int] = field(default_factory=list)
    pinned: bool = False
    last_used: float | None = None


@dataclass(frozen=True)
class CacheLookup:
    """What begin_turn found: how much of the prompt is already computed, and the live table."""

    num_cached_tokens: int
    miss_reason: MissReason | None  # None: a hit, the whole resident KV was reused
    block_table: list[int]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class KVCacheManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        residency: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.residency = residency
        self._clock = clock
        self._threads: dict[Hashable, ThreadCache] = {}
        self._lru: OrderedDict[Hashable, None] = OrderedDict()  # unpinned, with blocks; LRU first
        self._num_evictable_blocks = 0
        self._ever_held: set[Hashable] = set()
        self._hits = 0
        self._misses = {reason.value: 0 for reason in MissReason}
        self._evictions = 0
        self._preemptions = 0
        self._cached_tokens = 0
        self._computed_tokens = 0

    # ---- the turn ------------------------------------------------------------------------

    def begin_turn(
        self, key: Hashable, prompt_ids: Sequence[int], *, first_turn: bool
    ) -> CacheLookup:
        """Pin the thread and find how much of prompt_ids its resident KV already holds.

        At least the last prompt token is always left to compute: its logits give the first
        sampled token. Resident KV past the matching prefix is freed.
        """
        if not prompt_ids:
            raise ValueError("a turn needs at least one prompt token")
        entry = self._threads.get(key)
        if entry is not None and entry.pinned:
            raise ThreadInFlight(f"thread {key!r} already has a turn in flight")
        if entry is None:
            entry = self._threads[key] = ThreadCache(key)
        else:
            self._lru_remove(entry)
        entry.pinned = True

        held = entry.token_ids
        if not self.residency:
            num_cached, reason = 0, MissReason.DISABLED
        elif held:
            match = common_prefix_len(held, prompt_ids)
            num_cached = min(match, len(prompt_ids) - 1)
            reason = None if match == len(held) else MissReason.MISMATCH
        else:
            num_cached = 0
            if first_turn:
                reason = MissReason.NEW_THREAD
            elif key in self._ever_held:
                reason = MissReason.EVICTED
            else:
                reason = MissReason.RESTARTED
        self._truncate(entry, num_cached)
        if self.residency:
            self._ever_held.add(key)
        if reason is None:
            self._hits += 1
        else:
            self._misses[reason.value] += 1
        self._cached_tokens += num_cached
        return CacheLookup(num_cached, reason, entry.block_table)

    def ensure_blocks(self, key: Hashable, num_tokens: int) -> bool:
        """Grow a pinned thread's block table to hold num_tokens, evicting LRU threads if needed.

        Returns False, evicting nothing, when even evicting every unpinned thread is not enough.
        """
        entry = self._pinned_entry(key)
        need = self.pool.blocks_for(num_tokens) - len(entry.block_table)
        if need <= 0:
            return True
        if need > self.pool.num_free + self._num_evictable_blocks:
            return False
        while self.pool.num_free < need:
            self._evict_lru()
        entry.block_table.extend(self.pool.allocate(need, key))
        return True

    def can_ever_hold(self, num_tokens: int) -> bool:
        """Whether num_tokens fit in the whole pool (else no amount of eviction helps)."""
        return self.pool.blocks_for(num_tokens) <= self.num_blocks

    def finish_turn(self, key: Hashable, computed_ids: Sequence[int]) -> None:
        """Record the ids whose KV a pinned thread's blocks now hold; free blocks past them.

        Without residency the KV is not kept: every block goes back to the pool.
        """
        entry = self._pinned_entry(key)
        capacity = len(entry.block_table) * self.block_size
        if len(computed_ids) > capacity:
            raise ValueError(
                f"thread {key!r}: {len(computed_ids)} computed tokens but blocks for {capacity}"
            )
        entry.token_ids = list(computed_ids)
        self._truncate(entry, len(computed_ids) if self.residency else 0)

    def release(self, key: Hashable, keep_tokens: int | None = None) -> None:
        """End a pinned thread's turn: keep its first keep_tokens tokens (all if None), unpin.

        A thread left with no blocks is dropped; one with blocks becomes the most recently used.
        """
        entry = self._pinned_entry(key)
        if keep_tokens is not None:
            if keep_tokens < 0:
                raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
            self._truncate(entry, min(keep_tokens, len(entry.token_ids)))
        # Blocks reserved past the recorded tokens (a turn that never reached finish_turn).
        self._truncate(entry, len(entry.token_ids))
        entry.pinned = False
        entry.last_used = self._clock()
        if entry.block_table:
            self._lru[key] = None
            self._num_evictable_blocks += len(entry.block_table)
        else:
            del self._threads[key]

    def drop_blocks(self, key: Hashable) -> None:
        """Preemption: free every block of a pinned thread; its resident KV is lost."""
        entry = self._pinned_entry(key)
        if entry.block_table:
            self._preemptions += 1
        self._truncate(entry, 0)

    def forget(self, key: Hashable) -> None:
        """The thread was deleted: free its blocks and forget it was ever held."""
        entry = self._threads.get(key)
        if entry is not None:
            if entry.pinned:
                raise ThreadInFlight(f"thread {key!r} has a turn in flight; finish it first")
            self._lru_remove(entry)
            self.pool.free(entry.block_table)
            del self._threads[key]
        self._ever_held.discard(key)

    def note_computed(self, num_tokens: int) -> None:
        self._computed_tokens += num_tokens

    # ---- inspection ----------------------------------------------------------------------

    def is_pinned(self, key: Hashable) -> bool:
        entry = self._threads.get(key)
        return entry is not None and entry.pinned

    def lru_order(self) -> list[Hashable]:
        """Unpinned resident threads, least recently used (next to be evicted) first."""
        return list(self._lru)

    def thread_state(self, key: Hashable) -> ThreadCacheState:
        entry = self._threads.get(key)
        if entry is None:
            return ThreadCacheState(
                resident=False, pinned=False, cached_tokens=0, num_blocks=0, last_used=None
            )
        return ThreadCacheState(
            resident=bool(entry.block_table),
            pinned=entry.pinned,
            cached_tokens=len(entry.token_ids),
            num_blocks=len(entry.block_table),
            last_used=entry.last_used,
        )

    def stats(self) -> KVCacheStats:
        resident = sum(1 for e in self._threads.values() if e.block_table)
        pinned = sum(1 for e in self._threads.values() if e.pinned)
        return KVCacheStats(
            residency=self.residency,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            num_used_blocks=self.pool.num_used,
            num_free_blocks=self.pool.num_free,
            num_resident_threads=resident,
            num_pinned_threads=pinned,
            hits=self._hits,
            misses=dict(self._misses),
            evictions=self._evictions,
            preemptions=self._preemptions,
            cached_tokens=self._cached_tokens,
            computed_tokens=self._computed_tokens,
        )

    def check_integrity(self) -> None:
        """Every used block belongs to exactly one thread, and the LRU holds exactly the
        unpinned threads with blocks."""
        self.pool.check_integrity()
        seen: set[int] = set()
        evictable = 0
        for key, entry in self._threads.items():
            assert entry.key == key
            for block_id in entry.block_table:
                assert block_id not in seen, f"block {block_id} in two block tables"
                assert self.pool.owner(block_id) == key, f"block {block_id} owned by another"
                seen.add(block_id)
            assert len(entry.token_ids) <= len(entry.block_table) * self.block_size
            if entry.pinned:
                assert key not in self._lru, f"pinned thread {key!r} is evictable"
            else:
                assert entry.block_table, f"unpinned thread {key!r} kept without blocks"
                assert len(entry.block_table) == self.pool.blocks_for(len(entry.token_ids))
                assert key in self._lru, f"unpinned thread {key!r} missing from the LRU"
                evictable += len(entry.block_table)
        assert len(seen) == self.pool.num_used, (
            f"{self.pool.num_used} blocks used, {len(seen)} in block tables (leak)"
        )
        assert len(self._lru) == sum(1 for e in self._threads.values() if not e.pinned)
        assert evictable == self._num_evictable_blocks

    # ---- internals -----------------------------------------------------------------------

    def _pinned_entry(self, key: Hashable) -> ThreadCache:
        entry = self._threads.get(key)
        if entry is None or not entry.pinned:
            raise KeyError(f"thread {key!r} has no turn in flight")
        return entry

    def _truncate(self, entry: ThreadCache, num_tokens: int) -> None:
        """Keep the first num_tokens tokens; free the blocks past them (in place: the table is
        shared with the turn's Sequence)."""
        keep_blocks = self.pool.blocks_for(num_tokens)
        if len(entry.block_table) > keep_blocks:
            self.pool.free(entry.block_table[keep_blocks:])
            del entry.block_table[keep_blocks:]
        del entry.token_ids[num_tokens:]

    def _lru_remove(self, entry: ThreadCache) -> None:
        if entry.key in self._lru:
            del self._lru[entry.key]
            self._num_evictable_blocks -= len(entry.block_table)

    def _evict_lru(self) -> None:
        key, _ = self._lru.popitem(last=False)
        entry = self._threads.pop(key)
        self._num_evictable_blocks -= len(entry.block_table)
        self.pool.free(entry.block_table)
        self._evictions += 1
