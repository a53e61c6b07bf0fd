"""The tiers below the device pool, as plain ints: host memory and disk, each with an LRU and a budget.

    device pool  --evict-->  host tier  --evict-->  disk tier  --evict-->  gone (recompute)
         ^                       |                      |
         +------ restore --------+----------------------+

A thread lives in at most one tier at a time. A tier stores *blocks by content key*, each once,
and per thread an entry: its token ids and the content keys of its blocks, in order. The content
key of a full block is its chain hash (app/kvcache/block_hash.py: the same name it has in the
device pool, so a restored block that another thread already holds on the device is shared, not
copied); the last, partly filled block gets the chain hash of its few tokens. Two threads that
share a prefix (shared device blocks, forks) therefore store that prefix once per tier, and
moving the second one down copies only the blocks the tier does not hold yet: a shared block
moves once, not once per holder. A block is released when the last entry holding it goes.

    host:  entries  a -> [k1 k2 k3]   b -> [k1 k2 k9]       blocks k1 k2 k3 k9: 4 slots, not 6

Budgets count blocks (a block's bytes are fixed by the model and the block size); `add` never
goes past `capacity_blocks`, it evicts least recently used entries first (the caller moves each
one down before its blocks are released, see `KVHierarchy` in the engine). An entry being read
back (a disk restore in a worker thread) is pinned and never evicted.

Slots: the host tier copies block data into a tensor of `capacity_blocks` rows; `slot(key)` is
the row of a stored block. The disk tier names files by key and ignores slots.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from app.kvcache.block_hash import BlockHash, chain_hash, extend_hashes


class Tier(StrEnum):
    """Where a turn's cached tokens came from (and where a thread's KV lives now)."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


def content_keys(
    root: BlockHash, token_ids: Sequence[int], block_size: int, full: Sequence[BlockHash] = ()
) -> list[BlockHash]:
    """The content key of every block holding token_ids: the chain hashes of the full blocks
    (`full` may give the first of them, already computed), then one for a partial last block."""
    keys = list(full[: len(token_ids) // block_size])
    extend_hashes(keys, root, token_ids, block_size)
    tail = len(token_ids) % block_size
    if tail:
        prev = keys[-1] if keys else root
        keys.append(chain_hash(prev, token_ids[len(token_ids) - tail :]))
    return keys


@dataclass
class TierEntry:
    key: Hashable
    token_ids: list[int]
    block_keys: list[BlockHash]
    root: bytes = b""  # the hash chain's seed the keys were made with (a snapshot records it)
    pinned: bool = False  # being read back: never evicted
    broken: bool = False  # disk: found at start but unreadable; its turn says snapshot_invalid


@dataclass
class TierCounters:
    """Moves into and out of one tier, for /metrics."""

    offloads: int = 0  # threads moved into this tier
    offload_blocks: int = 0  # blocks copied in (blocks the tier already held are not copied)
    offload_seconds: float = 0.0
    restores: int = 0  # threads copied from this tier back into the device pool
    restore_blocks: int = 0
    restore_seconds: float = 0.0
    hits: int = 0  # turns whose cached tokens came from this tier
    evictions: int = 0  # threads pushed out of this tier (down one, or gone from the last)
    refused: dict[str, int] = field(default_factory=dict)  # disk: snapshots refused, by reason


class TierStore:
    """One tier's bookkeeping: entries (LRU first), blocks by content key with holder counts."""

    def __init__(self, tier: Tier, capacity_blocks: int) -> None:
        if capacity_blocks < 0:
            raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
        self.tier = tier
        self.capacity_blocks = capacity_blocks
        self.counters = TierCounters()
        self._entries: OrderedDict[Hashable, TierEntry] = OrderedDict()  # LRU first
        self._refs: dict[BlockHash, int] = {}
        self._slots: dict[BlockHash, int] = {}
        self._free_slots: list[int] = []  # released rows, reused before new ones
        self._next_slot = 0  # rows [0, _next_slot) were handed out at least once

    @property
    def enabled(self) -> bool:
        return self.capacity_blocks > 0

    @property
    def num_blocks(self) -> int:
        """Distinct blocks stored (what the budget counts)."""
        return len(self._refs)

    @property
    def num_threads(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def get(self, key: Hashable) -> TierEntry | None:
        return self._entries.get(key)

    def lru_keys(self) -> list[Hashable]:
        """Threads held, least recently used first."""
        return list(self._entries)

    def holds_block(self, block_key: BlockHash) -> bool:
        return block_key in self._refs

    def slot(self, block_key: BlockHash) -> int:
        return self._slots[block_key]

    def num_new_blocks(self, block_keys: Sequence[BlockHash]) -> int:
        """Blocks of block_keys this tier does not store yet (each distinct key once)."""
        return len({k for k in block_keys if k not in self._refs})

    def can_ever_hold(self, block_keys: Sequence[BlockHash]) -> bool:
        return len(set(block_keys)) <= self.capacity_blocks

    def lru_victim(self) -> TierEntry | None:
        """The least recently used entry that may be evicted, or None."""
        for entry in self._entries.values():
            if not entry.pinned:
                return entry
        return None

    def add(self, entry: TierEntry) -> list[tuple[int, int]]:
        """Store an entry (the caller made room: `num_new_blocks` <= `num_free`). Returns
        (index in entry.block_keys, slot) for every block to copy in: those not stored yet."""
        if entry.key in self._entries:
            raise ValueError(f"thread {entry.key!r} is already in the {self.tier} tier")
        if self.num_new_blocks(entry.block_keys) > self.num_free:
            raise RuntimeError(f"the {self.tier} tier has no room for {entry.key!r}")
        new = []
        for i, block_key in enumerate(entry.block_keys):
            if block_key not in self._refs:
                self._refs[block_key] = 0
                if self._free_slots:
                    slot = self._free_slots.pop()
                else:
                    slot, self._next_slot = self._next_slot, self._next_slot + 1
                self._slots[block_key] = slot
                new.append((i, slot))
            self._refs[block_key] += 1
        self._entries[entry.key] = entry
        return new

    def remove(self, key: Hashable) -> list[BlockHash]:
        """Drop an entry; returns the keys of the blocks nobody holds any more (released)."""
        entry = self._entries.pop(key)
        released = []
        for block_key in entry.block_keys:
            self._refs[block_key] -= 1
            if self._refs[block_key] == 0:
                del self._refs[block_key]
                self._free_slots.append(self._slots.pop(block_key))
                released.append(block_key)
        return released

    def touch(self, key: Hashable) -> None:
        self._entries.move_to_end(key)

    @property
    def num_free(self) -> int:
        return self.capacity_blocks - len(self._refs)

    def check_integrity(self) -> None:
        """Holder counts equal the entries' references; the budget holds; slots are distinct."""
        refs: dict[BlockHash, int] = {}
        for key, entry in self._entries.items():
            assert entry.key == key
            for block_key in entry.block_keys:
                refs[block_key] = refs.get(block_key, 0) + 1
        assert refs == self._refs, f"{self.tier} tier: block holder counts disagree"
        assert len(self._refs) <= self.capacity_blocks, f"{self.tier} tier over its budget"
        slots = set(self._slots.values())
        assert len(slots) == len(self._slots) and not slots & set(self._free_slots)
        assert all(0 <= s < self.capacity_blocks for s in slots), "a slot past the tier's rows"
        assert len(slots) + len(self._free_slots) == self._next_slot
        assert set(self._slots) == set(self._refs)
