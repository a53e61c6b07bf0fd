"""Per-thread KV residency over the block pool: reuse, sharing, pinning, LRU eviction, rollback.

Each thread that holds KV has one `ThreadCache`: its block table and the exact token ids whose
KV those blocks hold. A turn goes through

    begin_turn(key, prompt_ids, scope=s)   pin; keep the longest resident prefix of prompt_ids
                                           (the thread's own, or full blocks any thread of scope
                                           s computed), free the rest
    ensure_blocks(key, n) ...              grow the block table (evicting LRU threads)
    note_progress(key, ids, n)             the first n ids have KV now: name their full blocks
    finish_turn(key, ids)                  the ids whose KV is now held (prompt + generated[:-1])
    release(key, keep_tokens)              unpin, optionally truncate (a rollback), mark used
    count_turn(reason, cached, shared)     a committed turn's hit or miss, for stats()

and between turns a thread may be forked (`fork`: the child holds the parent's full blocks and a
copy of its partial one) or rewound (`truncate`).

Sharing. A full block gets a content address (app/kvcache/block_hash.py) once its KV is computed
and is then read-only: any thread of the same scope whose log starts with the same tokens may
hold it too (the pool counts holders). A block is freed when its last holder lets go, and even
then stays findable in the free queue until an allocation reuses it. The last, partly filled
block of a thread is always private: a thread whose kept tokens end inside a block it does not
own alone gets a copy of it first (`copy_block(src, dst)`, done by the engine in the KV tensor).
A thread whose prompt goes on, past the full blocks it found, with tokens another thread of its
scope holds in its next block (partly filled, or full with other tokens after them) gets a copy
of that block at admission and keeps the matching tokens: cached, though not shared (the copy
is its own). 100 threads on one 1,000-token system prompt compute only their own messages.
A scope of None keeps a thread out of sharing altogether (no hashes, nothing found).

    thread a:  [ 7 | 2 | 9 ]   a b c d | e f g h | i j . .
    thread b:  [ 7 | 2 | 4 ]   a b c d | e f g h | x . . .     7 and 2 held twice, 9 and 4 private
    truncate(b, 6):  [ 7 | 5 ]  block 2 is shared, so its first 2 slots are copied into 5 first

Placement. A thread's table grows into the pool block right after its last one whenever that block
is free (BlockPool.allocate), so a history usually stands in consecutive blocks and attention reads
it in place. Threads in a turn grow at once, so each keeps the room after its last block (an equal
share of the free blocks, at most MAX_CLAIM_BLOCKS): a table that starts elsewhere (a new thread,
one whose next block is taken) starts past those claims.

A pinned thread is never evicted. Unpinned threads with blocks sit in an LRU (an OrderedDict,
least recently used first) and are evicted whole when an allocation needs room; evicting one
frees only the blocks nobody else holds. `drop_blocks` takes a pinned thread's blocks back
(preemption): its turn recomputes from scratch.

The block table of a thread is one list, handed to the turn's Sequence by `begin_turn`; the
manager appends to it while the turn runs and only shortens it (or replaces its last, partial
block by a private copy) when a turn begins, is preempted, or is released.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

from app.kvcache.block_hash import BlockHash, extend_hashes, root_hash
from app.kvcache.block_pool import BlockPool
from app.kvcache.miss_reason import MissReason
from app.kvcache.prefix_index import match_prefix
from app.kvcache.stats import KVCacheStats, ThreadCacheState

CopyBlock = Callable[[int, int], None]  # (src, dst): copy one block's KV, all layers
# Room kept after the last block of each thread in a turn, at most (512 blocks: 8,192 tokens of 16).
MAX_CLAIM_BLOCKS = 512


class ThreadInFlight(RuntimeError):
    """The thread already has a turn in flight (or one awaiting commit/rollback)."""


@dataclass
class ThreadCache:
    key: Hashable
    token_ids: list[int] = field(default_factory=list)  # ids whose KV the blocks hold
    block_table: list[int] = field(default_factory=list)
    # Chain hashes of the thread's full blocks (empty when it does not share: root is None).
    block_hashes: list[BlockHash] = field(default_factory=list)
    root: BlockHash | None = None
    pinned: bool = False
    last_used: float | None = None
    # The thread's committed log length when this process last committed or cut it (None:
    # unknown); a later turn whose history is longer finds it moved on elsewhere (stale).
    num_log_tokens: int | None = None


@dataclass(frozen=True)
class CacheLookup:
    """What begin_turn found: how much of the prompt is already computed, and the live table."""

    num_cached_tokens: int
    miss_reason: MissReason | None  # None: a hit, the whole resident KV was reused
    block_table: list[int]
    # Of the cached tokens, those in blocks other threads hold too. The tokens of a partial
    # block copied from another thread are cached but not shared: the copy is private.
    num_shared_tokens: int = 0


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    # A turn usually extends its thread's log: one comparison in C, not a Python loop over the
    # whole history every turn (0.4 ms at 8,000 tokens).
    if list(a[:n]) == list(b[:n]):
        return n
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
        identity: bytes = b"",
        copy_block: CopyBlock | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[ThreadCache], None] | None = None,
    ) -> None:
        """`identity` names the model and the KV layout: blocks are shared only between
        threads of the same identity and scope. `copy_block(src, dst)` copies a block's KV
        (the engine's pool); without it copies are only counted (bookkeeping tests).
        `on_evict(entry)` sees a thread evicted for room while its blocks still hold its KV
        (the engine moves it down a tier); it must not allocate from this manager."""
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.residency = residency
        self.identity = identity
        self.copy_block = copy_block
        self.on_evict = on_evict
        self._clock = clock
        self._threads: dict[Hashable, ThreadCache] = {}
        self._lru: OrderedDict[Hashable, None] = OrderedDict()  # unpinned, with blocks; LRU first
        self._in_turn: dict[Hashable, ThreadCache] = {}  # begin_turn .. release: tables that grow
        self._ever_held: set[Hashable] = set()
        self._hits = 0
        self._misses = {reason.value: 0 for reason in MissReason}
        self._evictions = 0
        self._preemptions = 0
        self._cached_tokens = 0
        self._shared_tokens = 0
        self._computed_tokens = 0
        self._block_copies = 0
        # prev hash -> threads that held KV in the block after it (the block named prev, or
        # the root for block 0): where begin_turn looks for a partial block to copy. Lazy:
        # an entry may be stale (the thread let go of that block since) and is verified,
        # token by token, when found; every resident thread's blocks are listed.
        self._next: dict[BlockHash, dict[Hashable, None]] = {}

    # ---- the turn ------------------------------------------------------------------------

    def begin_turn(
        self,
        key: Hashable,
        prompt_ids: Sequence[int],
        *,
        first_turn: bool,
        scope: Hashable | None = None,
        num_history_tokens: int | None = None,
    ) -> CacheLookup:
        """Pin the thread and find how much of prompt_ids is already computed: its own resident
        KV, or (when scope is not None) full blocks of the same scope that any thread computed.
        `num_history_tokens` (the committed log's length, the rest of prompt_ids is the new
        message) tells a resident KV left behind by turns committed elsewhere (`stale`).

        At least the last prompt token is always left to compute: its logits give the first
        sampled token. Resident KV past the kept prefix is freed.
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
        self._in_turn[key] = entry
        root = root_hash(self.identity, scope) if scope is not None and self.residency else None
        if entry.root != root:
            self._truncate(entry, 0)  # KV named under another scope (or none): start over
            entry.root = root

        held = entry.token_ids
        if not self.residency:
            num_cached, reason = 0, MissReason.DISABLED
        elif held:
            match = common_prefix_len(held, prompt_ids)
            num_cached = min(match, len(prompt_ids) - 1)
            reason = None if match == len(held) else MissReason.MISMATCH
            if (
                reason is None
                and num_history_tokens is not None
                and entry.num_log_tokens is not None
                and num_history_tokens > entry.num_log_tokens
            ):
                reason = MissReason.STALE
        else:
            num_cached = 0
            if first_turn:
                reason = MissReason.NEW_THREAD
            elif key in self._ever_held:
                reason = MissReason.EVICTED
            else:
                reason = MissReason.RESTARTED
        found: range = range(0)  # indices of the blocks taken from the prefix index
        if root is not None:
            num_own_full = num_cached // self.block_size
            max_blocks = (len(prompt_ids) - 1) // self.block_size
            if max_blocks > num_own_full:
                extend_hashes(
                    entry.block_hashes, root, held[: num_own_full * self.block_size],
                    self.block_size,
                )  # fmt: skip
                matched = match_prefix(
                    self.pool,
                    root,
                    prompt_ids,
                    known=entry.block_hashes[:num_own_full],
                    max_blocks=max_blocks,
                )
                if matched and (num_own_full + len(matched)) * self.block_size > num_cached:
                    self._truncate(entry, num_own_full * self.block_size)
                    for block_id, block_hash in matched:
                        self.pool.acquire(block_id)
                        entry.block_table.append(block_id)
                        entry.block_hashes.append(block_hash)
                    num_cached = len(entry.block_table) * self.block_size
                    entry.token_ids = list(prompt_ids[:num_cached])
                    found = range(num_own_full, len(entry.block_table))
        self._truncate(entry, num_cached)
        num_cached = len(entry.token_ids)  # less when a shared partial block found no room
        if root is not None and num_cached % self.block_size == 0:
            num_cached = self._may_copy_partial(entry, prompt_ids)
        if self.residency:
            self._ever_held.add(key)
        num_shared = self.block_size * sum(
            1
            for i, block_id in enumerate(entry.block_table[: num_cached // self.block_size])
            if i in found or self.pool.ref_count(block_id) > 1
        )
        return CacheLookup(num_cached, reason, entry.block_table, num_shared)

    def ensure_blocks(self, key: Hashable, num_tokens: int) -> bool:
        """Grow a pinned thread's block table to hold num_tokens, evicting LRU threads if needed.

        Returns False, evicting nothing, when even evicting every unpinned thread is not enough.
        """
        entry = self._pinned_entry(key)
        need = self.pool.blocks_for(num_tokens) - len(entry.block_table)
        if need <= 0:
            return True
        if not self._make_room(need):
            return False
        entry.block_table.extend(self._allocate(entry, need))
        return True

    def can_ever_hold(self, num_tokens: int) -> bool:
        """Whether num_tokens fit in the whole pool (else no amount of eviction helps)."""
        return self.pool.blocks_for(num_tokens) <= self.num_blocks

    def note_progress(self, key: Hashable, token_ids: Sequence[int], num_computed: int) -> None:
        """The first num_computed of token_ids have their KV in a pinned thread's blocks now:
        name its newly full blocks, so that other turns can share them at once."""
        entry = self._pinned_entry(key)
        if entry.root is None or num_computed // self.block_size <= len(entry.block_hashes):
            return
        self._name_full_blocks(entry, token_ids[:num_computed])

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
        if entry.root is not None:
            self._name_full_blocks(entry, entry.token_ids)
        self._truncate(entry, len(computed_ids) if self.residency else 0)
        self._index(entry)

    def release(
        self, key: Hashable, keep_tokens: int | None = None, *, num_log_tokens: int | None = None
    ) -> None:
        """End a pinned thread's turn: keep its first keep_tokens tokens (all if None), unpin.
        `num_log_tokens`: the committed log's length after this turn, when the caller knows it.

        A thread left with no blocks is dropped; one with blocks becomes the most recently used.
        """
        entry = self._pinned_entry(key)
        if num_log_tokens is not None:
            entry.num_log_tokens = num_log_tokens
        if keep_tokens is not None:
            if keep_tokens < 0:
                raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
            self._truncate(entry, min(keep_tokens, len(entry.token_ids)))
        # Blocks reserved past the recorded tokens (a turn that never reached finish_turn).
        self._truncate(entry, len(entry.token_ids))
        entry.pinned = False
        self._in_turn.pop(key, None)
        self._index(entry)
        self._park(entry)

    def drop_blocks(self, key: Hashable) -> None:
        """Preemption: let go of every block of a pinned thread; its resident KV is lost."""
        entry = self._pinned_entry(key)
        if entry.block_table:
            self._preemptions += 1
        self._truncate(entry, 0)

    def forget(self, key: Hashable) -> None:
        """The thread was deleted: let go of its blocks and forget it was ever held. Blocks
        other threads hold stay."""
        entry = self._threads.get(key)
        if entry is not None:
            if entry.pinned:
                raise ThreadInFlight(f"thread {key!r} has a turn in flight; finish it first")
            self._lru_remove(entry)
            self.pool.free(entry.block_table)
            self._unindex(entry)
            del self._threads[key]
        self._ever_held.discard(key)

    def adopt(
        self, key: Hashable, token_ids: Sequence[int], *, scope: Hashable | None = None
    ) -> list[tuple[int, int]] | None:
        """A restore: a thread that holds no blocks gets blocks for token_ids, whose KV the
        caller then copies in (from the host or the disk tier). Full blocks another thread
        already holds (same scope, same prefix: found by hash) are shared instead. Returns
        (index in token_ids' blocks, block id) of every block to fill, or None (nothing
        taken) when the pool has no room. The thread is parked as the most recently used."""
        if key in self._threads:
            raise ValueError(f"thread {key!r} already holds KV")
        if not token_ids or not self.residency:
            return None
        root = root_hash(self.identity, scope) if scope is not None else None
        hashes: list[BlockHash] = []
        if root is not None:
            extend_hashes(hashes, root, token_ids, self.block_size)
        num_blocks = self.pool.blocks_for(len(token_ids))
        table: list[int | None] = [None] * num_blocks
        for i, block_hash in enumerate(hashes):
            found = self.pool.lookup(block_hash)
            if found is not None:
                self.pool.acquire(found)  # taken before _make_room can reuse it
                table[i] = found
        missing = [i for i, b in enumerate(table) if b is None]
        # Held, pinned and out of the LRU while room is made: its found blocks are not evictable.
        entry = ThreadCache(key, root=root, pinned=True)
        entry.block_table = [b for b in table if b is not None]
        self._threads[key] = entry
        if not self._make_room(len(missing)):
            del self._threads[key]
            self.pool.free(entry.block_table)
            return None
        fresh = self._allocate(entry, len(missing), [])  # a run of its own, past the claims
        for i, block_id in zip(missing, fresh, strict=True):
            table[i] = block_id
        entry.block_table = [b for b in table if b is not None]
        entry.token_ids = list(token_ids)
        entry.pinned = False
        if root is not None:
            self._name_full_blocks(entry, entry.token_ids)
            self._index(entry)
        self._ever_held.add(key)
        self._park(entry)
        return list(zip(missing, fresh, strict=True))

    def count_turn(self, miss_reason: MissReason | None, num_cached: int, num_shared: int) -> None:
        """A turn committed: count its hit or miss and the prompt tokens it found cached.

        Counted when the turn ends, not at begin_turn: a preempted turn is admitted again and
        ends a miss (evicted), a rolled back one is not billed, and these counters agree with
        the ledger."""
        if miss_reason is None:
            self._hits += 1
        else:
            self._misses[miss_reason.value] += 1
        self._cached_tokens += num_cached
        self._shared_tokens += num_shared

    def note_computed(self, num_tokens: int) -> None:
        self._computed_tokens += num_tokens

    # ---- between turns: fork and rewind ----------------------------------------------------

    def fork(self, parent: Hashable, child: Hashable, token_ids: Sequence[int]) -> int:
        """A new thread `child` whose log is token_ids holds the KV the parent has of it: the
        parent's full blocks (shared, nothing copied) and a private copy of a partial last block
        (skipped, and recomputed later, when no block is free). Returns the tokens it holds.
        The parent may be in flight: only KV it held before its turn is shared."""
        if child in self._threads:
            raise ValueError(f"thread {child!r} already holds KV")
        source = self._threads.get(parent)
        self._ever_held.add(child)
        if source is None or not self.residency:
            return 0
        num_tokens = common_prefix_len(source.token_ids, token_ids)
        if source.pinned:  # its table grows past its token ids: share only what they cover
            num_tokens = min(num_tokens, len(source.token_ids))
        num_full = num_tokens // self.block_size
        entry = ThreadCache(child, root=source.root, num_log_tokens=len(token_ids))
        entry.block_table = source.block_table[:num_full]
        if source.root is not None:
            # Shared blocks are named. A full block of the parent's that is not (a copy of a
            # prefix another block already holds) is swapped for that block: same KV.
            entry.block_hashes = source.block_hashes[:num_full]
            for i, block_hash in enumerate(entry.block_hashes):
                if self.pool.lookup(block_hash) is None:
                    self.pool.register(entry.block_table[i], block_hash)
                entry.block_table[i] = self.pool.lookup(block_hash)  # type: ignore[assignment]
        for block_id in entry.block_table:
            self.pool.acquire(block_id)
        entry.token_ids = list(token_ids[: num_full * self.block_size])
        if num_tokens > num_full * self.block_size:
            src = source.block_table[num_full]
            self.pool.acquire(src)  # kept from reuse while a copy is found room for
            was_parked = not source.pinned
            self._lru_remove(source)
            dst = self._allocate_private(entry, entry.block_table)
            if dst is not None:
                self._copy(src, dst)
                entry.block_table.append(dst)
                entry.token_ids = list(token_ids[:num_tokens])
            self.pool.free([src])
            if was_parked and parent in self._threads:
                self._lru[parent] = None
        self._threads[child] = entry
        self._index(entry)
        self._park(entry)
        return len(entry.token_ids)

    def truncate(self, key: Hashable, token_ids: Sequence[int]) -> int:
        """Rewind: the thread's log is now token_ids (a prefix of what it was); keep the KV of
        what remains of it. Returns the tokens still held."""
        entry = self._threads.get(key)
        if entry is None:
            return 0
        if entry.pinned:
            raise ThreadInFlight(f"thread {key!r} has a turn in flight")
        self._lru_remove(entry)
        self._truncate(entry, common_prefix_len(entry.token_ids, token_ids))
        entry.num_log_tokens = len(token_ids)
        self._park(entry)
        return len(entry.token_ids)

    # ---- inspection ----------------------------------------------------------------------

    def holds(self, key: Hashable) -> bool:
        """Whether the thread has an entry here (blocks, or a turn in flight)."""
        return key in self._threads

    def threads(self) -> list[Hashable]:
        """Every thread with an entry (resident or in flight)."""
        return list(self._threads)

    def peek(self, key: Hashable) -> ThreadCache | None:
        """The thread's entry, read-only (the KV hierarchy reads what it moves down)."""
        return self._threads.get(key)

    def is_pinned(self, key: Hashable) -> bool:
        entry = self._threads.get(key)
        return entry is not None and entry.pinned

    def lru_order(self) -> list[Hashable]:
        """Unpinned resident threads, least recently used (next to be evicted) first."""
        return list(self._lru)

    def holders(self, block_id: int) -> list[Hashable]:
        """The threads whose block tables hold block_id (tests and debugging: a full scan)."""
        return [k for k, e in self._threads.items() if block_id in e.block_table]

    def thread_state(self, key: Hashable) -> ThreadCacheState:
        entry = self._threads.get(key)
        if entry is None:
            return ThreadCacheState(
                resident=False, pinned=False, cached_tokens=0, num_blocks=0, last_used=None
            )
        num_held = len(entry.token_ids)
        shared = sum(
            min(self.block_size, num_held - i * self.block_size)
            for i, block_id in enumerate(entry.block_table)
            if self.pool.ref_count(block_id) > 1 and i * self.block_size < num_held
        )
        return ThreadCacheState(
            resident=bool(entry.block_table),
            pinned=entry.pinned,
            cached_tokens=num_held,
            num_blocks=len(entry.block_table),
            last_used=entry.last_used,
            shared_tokens=shared,
            tier="device" if entry.block_table else None,
        )

    def stats(self) -> KVCacheStats:
        resident = sum(1 for e in self._threads.values() if e.block_table)
        pinned = sum(1 for e in self._threads.values() if e.pinned)
        logical = 0
        filled: dict[int, int] = {}  # block -> tokens of KV it holds (the most any holder uses)
        for entry in self._threads.values():
            logical += len(entry.token_ids)
            for i, block_id in enumerate(entry.block_table):
                n = min(self.block_size, len(entry.token_ids) - i * self.block_size)
                if n > filled.get(block_id, 0):
                    filled[block_id] = n
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
            shared_tokens=self._shared_tokens,
            num_shared_blocks=sum(1 for b in filled if self.pool.ref_count(b) > 1),
            num_cached_free_blocks=self.pool.num_cached_free,
            logical_tokens=logical,
            unique_tokens=sum(filled.values()),
            block_copies=self._block_copies,
        )

    def check_integrity(self) -> None:
        """Each block's reference count is the number of block tables holding it; shared blocks
        are named (read-only); a thread's partial last block is its own; the LRU holds exactly
        the unpinned threads with blocks."""
        self.pool.check_integrity()
        holders = [0] * self.num_blocks
        for key, entry in self._threads.items():
            assert entry.key == key
            assert len(set(entry.block_table)) == len(entry.block_table), (
                f"thread {key!r} holds a block twice"
            )
            for block_id in entry.block_table:
                holders[block_id] += 1
            assert len(entry.token_ids) <= len(entry.block_table) * self.block_size
            if entry.root is None:
                assert not entry.block_hashes, f"thread {key!r} names blocks without a scope"
            assert len(entry.block_hashes) <= len(entry.block_table)
            for block_id, block_hash in zip(entry.block_table, entry.block_hashes, strict=False):
                assert self.pool.block_hash(block_id) in (None, block_hash), (
                    f"block {block_id} of {key!r} is named for other tokens"
                )
            if entry.pinned:
                assert key not in self._lru, f"pinned thread {key!r} is evictable"
            else:
                assert entry.block_table, f"unpinned thread {key!r} kept without blocks"
                assert len(entry.block_table) == self.pool.blocks_for(len(entry.token_ids))
                assert key in self._lru, f"unpinned thread {key!r} missing from the LRU"
                if entry.root is not None:
                    assert len(entry.block_hashes) == len(entry.token_ids) // self.block_size
                    for prev in [entry.root, *entry.block_hashes][: len(entry.block_table)]:
                        assert key in self._next.get(prev, ()), (
                            f"thread {key!r} is missing from the partial block index"
                        )
                if len(entry.token_ids) % self.block_size:
                    assert self.pool.is_private(entry.block_table[-1]), (
                        f"thread {key!r}'s partial last block is shared"
                    )
        for block_id, count in enumerate(holders):
            assert self.pool.ref_count(block_id) == count, (
                f"block {block_id}: {self.pool.ref_count(block_id)} references, {count} holders"
            )
            if count > 1 and self.pool.block_hash(block_id) is None:
                # Threads outside sharing (no scope) fork by sharing unnamed full blocks.
                assert all(e.root is None for e in self._threads.values()
                           if block_id in e.block_table), (
                    f"block {block_id} is shared but unnamed (writable)"
                )  # fmt: skip
        assert len(self._lru) == sum(1 for e in self._threads.values() if not e.pinned)
        for key, entry in self._in_turn.items():
            assert self._threads.get(key) is entry and entry.pinned, f"{key!r} left its turn"

    # ---- internals -----------------------------------------------------------------------

    def _pinned_entry(self, key: Hashable) -> ThreadCache:
        entry = self._threads.get(key)
        if entry is None or not entry.pinned:
            raise KeyError(f"thread {key!r} has no turn in flight")
        return entry

    def _name_full_blocks(self, entry: ThreadCache, token_ids: Sequence[int]) -> None:
        assert entry.root is not None
        start = len(entry.block_hashes)
        extend_hashes(entry.block_hashes, entry.root, token_ids, self.block_size)
        for i in range(start, len(entry.block_hashes)):
            # False: another block already holds this prefix; this copy stays private.
            self.pool.register(entry.block_table[i], entry.block_hashes[i])

    def _truncate(self, entry: ThreadCache, num_tokens: int) -> None:
        """Keep the first num_tokens tokens and let go of the blocks past them (in place: the
        table is shared with the turn's Sequence). A kept partial last block that is shared
        or named is replaced by a private copy (or dropped, when no block is free)."""
        bs = self.block_size
        keep_blocks = self.pool.blocks_for(num_tokens)
        if len(entry.block_table) > keep_blocks:
            self.pool.free(entry.block_table[keep_blocks:])
            del entry.block_table[keep_blocks:]
        del entry.token_ids[num_tokens:]
        del entry.block_hashes[num_tokens // bs :]
        if num_tokens % bs and entry.block_table:
            last = entry.block_table[-1]
            if self.pool.is_private(last):
                return
            if self.pool.ref_count(last) == 1:
                self.pool.unregister(last)  # ours alone: un-name it, then write on
                return
            was_parked = entry.key in self._lru
            self._lru_remove(entry)
            dst = self._allocate_private(entry, entry.block_table[:-1])
            if dst is None:
                self.pool.free([last])
                del entry.block_table[-1]
                del entry.token_ids[(num_tokens // bs) * bs :]
            else:
                self._copy(last, dst)
                self.pool.free([last])
                entry.block_table[-1] = dst
            if was_parked and entry.block_table:
                self._lru[entry.key] = None

    def _may_copy_partial(self, entry: ThreadCache, prompt_ids: Sequence[int]) -> int:
        """Copy-on-admission. The entry holds prompt_ids' first n full blocks and nothing past
        them; when another thread of its scope holds KV of the tokens that follow, in its block
        n (partly filled, or full with other tokens after them), copy that block into a private
        one and keep its matching tokens. Returns the tokens the entry holds now.

            other:  [ 7 | 2 | 9 ]   a b c d | e f g h | i j k l
            entry:  [ 7 | 2 | 5 ]   a b c d | e f g h | i j . .   5 = copy of 9, 2 ids kept
        """
        bs = self.block_size
        n = len(entry.block_table)
        start = n * bs
        limit = min(start + bs, len(prompt_ids) - 1)  # the last prompt token is computed
        if limit <= start:
            return start
        extend_hashes(entry.block_hashes, entry.root, entry.token_ids, bs)  # type: ignore[arg-type]
        prev = entry.block_hashes[n - 1] if n else entry.root
        candidates = self._next.get(prev)  # type: ignore[arg-type]
        if not candidates:
            return start
        want = list(prompt_ids[start:limit])
        best, best_len = None, 0
        for key in list(candidates):
            other = self._threads.get(key)
            if (
                other is None
                or other.root != entry.root
                or len(other.token_ids) <= start
                or (n and other.block_hashes[n - 1 : n] != [prev])
            ):
                del candidates[key]  # stale: the thread let go of that block
                continue
            if key == entry.key:
                continue
            match = common_prefix_len(other.token_ids[start : start + bs], want)
            if match > best_len and other.token_ids[:start] == entry.token_ids[:start]:
                best, best_len = other, match
                if match == len(want):
                    break
        if not candidates:
            del self._next[prev]  # type: ignore[arg-type]
        if best is None:
            return start
        src = best.block_table[n]
        self.pool.acquire(src)  # kept from reuse while a copy is found room for
        was_parked = best.key in self._lru
        self._lru_remove(best)
        dst = self._allocate_private(entry, entry.block_table)
        if dst is not None:
            self._copy(src, dst)
            entry.block_table.append(dst)
            entry.token_ids = list(prompt_ids[: start + best_len])
        self.pool.free([src])
        if was_parked and best.key in self._threads:
            self._lru[best.key] = None
        return len(entry.token_ids)

    def _index(self, entry: ThreadCache) -> None:
        """List the thread under the hash before each block it holds (see `_next`)."""
        if entry.root is None:
            return
        for prev in [entry.root, *entry.block_hashes][: len(entry.block_table)]:
            self._next.setdefault(prev, {})[entry.key] = None

    def _unindex(self, entry: ThreadCache) -> None:
        if entry.root is None:
            return
        for prev in [entry.root, *entry.block_hashes]:
            holders = self._next.get(prev)
            if holders is not None:
                holders.pop(entry.key, None)
                if not holders:
                    del self._next[prev]

    def _copy(self, src: int, dst: int) -> None:
        if self.copy_block is not None:
            self.copy_block(src, dst)
        self._block_copies += 1

    def _allocate_private(self, entry: ThreadCache, before: list[int]) -> int | None:
        """One fresh block for `entry`, to stand after the blocks `before` it; evicting LRU
        threads if need be; None if none can be had."""
        if not self._make_room(1):
            return None
        return self._allocate(entry, 1, before)[0]

    def _allocate(self, entry: ThreadCache, num: int, before: list[int] | None = None) -> list[int]:
        """num free blocks (room made already) to stand after `before` (the entry's table by
        default) in the entry's table: right after its last block when they can, else past the
        room kept for the other threads in a turn (see "Placement" above)."""
        before = entry.block_table if before is None else before
        return self.pool.allocate(
            num, after=before[-1] if before else None, claims=self._claims(entry)
        )

    def _claims(self, entry: ThreadCache) -> list[tuple[int, int]]:
        """[start, stop) after the last block of every other thread in a turn: the room each
        keeps to grow into, an equal share of the free blocks (at most MAX_CLAIM_BLOCKS)."""
        others = [e for e in self._in_turn.values() if e is not entry and e.block_table]
        if not others:
            return []
        room = min(MAX_CLAIM_BLOCKS, self.pool.num_free // (len(others) + 1))
        return [(e.block_table[-1] + 1, e.block_table[-1] + 1 + room) for e in others if room]

    def _num_evictable(self) -> int:
        """Blocks that evicting every thread in the LRU would free: those no other thread (a
        pinned one, or one taken out of the LRU while it is worked on) holds."""
        kept: set[int] = set()
        for key, entry in self._threads.items():
            if key not in self._lru:
                kept.update(entry.block_table)
        return self.pool.num_used - len(kept)

    def _make_room(self, need: int) -> bool:
        """Free blocks until `need` are free, evicting LRU threads; False (evicting nothing)
        when even evicting every unpinned thread would not be enough."""
        if need <= self.pool.num_free:
            return True
        if need > self.pool.num_free + self._num_evictable():
            return False
        while self.pool.num_free < need:
            self._evict_lru()
        return True

    def _park(self, entry: ThreadCache) -> None:
        """An unpinned thread: the most recently used if it holds blocks, else forgotten."""
        entry.last_used = self._clock()
        if entry.block_table:
            self._lru[entry.key] = None
        else:
            self._unindex(entry)
            del self._threads[entry.key]

    def _lru_remove(self, entry: ThreadCache) -> None:
        self._lru.pop(entry.key, None)

    def evict(self, key: Hashable) -> bool:
        """Evict one unpinned resident thread now, as if the LRU had chosen it (tests and
        benchmarks: move a thread down a tier). False if it is not resident or is pinned."""
        if key not in self._lru:
            return False
        self._lru.move_to_end(key, last=False)
        self._evict_lru()
        return True

    def _evict_lru(self) -> None:
        key, _ = self._lru.popitem(last=False)
        entry = self._threads.pop(key)
        if self.on_evict is not None:
            self.on_evict(entry)  # its blocks still hold its KV: moved down a tier
        self.pool.free(entry.block_table)
        self._unindex(entry)
        self._evictions += 1
