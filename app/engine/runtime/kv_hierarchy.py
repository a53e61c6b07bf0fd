"""The KV hierarchy: threads evicted from the device pool move to host memory, then to disk.

    hierarchy = KVHierarchy(kv, pool, host_blocks=64, disk=DiskStore(folder, layout),
                            disk_blocks=1024)            # kv.on_evict is now hierarchy.spill
    tier = hierarchy.restore(key, history_ids, scope)    # before kv.begin_turn, engine lock held
    hierarchy.persist_all(timeout_s=30)                  # at shutdown: everything to disk

The bookkeeping (which thread is where, budgets, LRUs, which blocks each tier stores) is plain
ints in app/kvcache/tiers.py; this module makes the copies that go with it: device <-> host rows
(app/engine/network/kv_offload.py) and host or device -> disk files (kv_store.py, on its writer
thread). Everything here runs on the engine thread with the engine's lock held, between steps,
except `load_from_disk`, which a worker thread runs before the turn is submitted (the async
bridge), so that a disk read never stalls the other threads' decoding.

A thread is in exactly one place: the device pool, the host tier, the disk tier, or nowhere. A
restore moves it up (its lower copy is dropped: the turn will extend it anyway).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from app.engine.network.kv_offload import HostKVRows, gather_blocks, scatter_blocks
from app.engine.network.kv_pool import KVPool
from app.engine.runtime.kv_store import DiskStore, LoadedSnapshot, SnapshotInvalid
from app.kvcache.block_hash import BlockHash, root_hash
from app.kvcache.manager import KVCacheManager, ThreadCache
from app.kvcache.tiers import Tier, TierEntry, TierStore, content_keys

log = logging.getLogger(__name__)

Fetch = Callable[[list[int]], torch.Tensor]  # block indexes of an entry -> CPU rows


@dataclass(frozen=True)
class TierState:
    threads: int
    blocks: int
    bytes: int
    capacity_bytes: int


@dataclass(frozen=True)
class TierStats:
    """Per tier (device, host, disk): what it holds, and the moves in and out of it."""

    tiers: dict[str, TierState]
    hits: dict[str, int]  # turns whose cached tokens came from the tier
    offloads: dict[str, int]  # threads moved into host or disk
    offload_bytes: dict[str, int]
    offload_seconds: dict[str, float]
    restores: dict[str, int]  # threads copied back from host or disk
    restore_bytes: dict[str, int]
    restore_seconds: dict[str, float]
    evictions: dict[str, int]  # threads pushed out of host or disk (from disk: gone)
    snapshots_refused: dict[str, int]  # disk snapshots refused, by reason


class KVHierarchy:
    def __init__(
        self,
        kv: KVCacheManager,
        pool: KVPool,
        *,
        host_blocks: int = 0,
        disk: DiskStore | None = None,
        disk_blocks: int = 0,
    ) -> None:
        self.kv = kv
        self.pool = pool
        self.block_bytes = pool.tensor[:, :, 0].numel() * pool.tensor.element_size()
        self.host = TierStore(Tier.HOST, host_blocks)
        self.host_rows = HostKVRows(pool, host_blocks) if host_blocks else None
        self.disk = TierStore(Tier.DISK, disk_blocks if disk is not None else 0)
        self.store = disk if disk_blocks else None
        self.device_hits = 0
        kv.on_evict = self.spill
        if self.store is not None:
            self._load_index()

    # ---- where a thread is -------------------------------------------------------------------

    def where(self, key: Hashable) -> Tier | None:
        if key in self.host:
            return Tier.HOST
        if key in self.disk:
            return Tier.DISK
        return None

    def held_tokens(self, key: Hashable) -> list[int]:
        entry = self.host.get(key) or self.disk.get(key)
        return list(entry.token_ids) if entry is not None else []

    # ---- down: device -> host -> disk ----------------------------------------------------------

    def spill(self, entry: ThreadCache) -> None:
        """A thread evicted from the device pool (its blocks still hold its KV): to the host
        tier, or when that cannot take it, to disk; past both it is gone."""
        if not entry.token_ids:
            return
        root = entry.root if entry.root is not None else self._private_root(entry.key)
        keys = content_keys(root, entry.token_ids, self.kv.block_size, entry.block_hashes)
        tier_entry = TierEntry(entry.key, list(entry.token_ids), keys, root=root)
        blocks = list(entry.block_table)
        if self._make_room(self.host, keys, self._host_to_disk):
            start = time.perf_counter()
            new = self.host.add(tier_entry)
            assert self.host_rows is not None
            self.host_rows.offload([blocks[i] for i, _ in new], [slot for _, slot in new])
            self._count_offload(self.host, len(new), start)
            return
        self._to_disk(tier_entry, lambda idx: gather_blocks(self.pool, [blocks[i] for i in idx]))

    def _host_to_disk(self, entry: TierEntry) -> None:
        """Evict a host entry: to disk (its rows read first), then its host rows are released."""
        assert self.host_rows is not None
        rows = self.host_rows
        slots = [self.host.slot(k) for k in entry.block_keys]

        def fetch(idx: list[int]) -> torch.Tensor:
            return rows.read([slots[i] for i in idx])

        self.host.remove(entry.key)
        self.host.counters.evictions += 1
        # Re-added below the host tier; the rows stay intact until a later copy reuses them.
        self._to_disk(entry, fetch)

    def _to_disk(self, entry: TierEntry, fetch: Fetch) -> None:
        if self.store is None or not self._make_room(self.disk, entry.block_keys, self._drop_disk):
            return  # past the last tier: gone, its next turn recomputes (miss: evicted)
        start = time.perf_counter()
        disk_entry = TierEntry(entry.key, entry.token_ids, entry.block_keys, root=entry.root)
        new = self.disk.add(disk_entry)
        rows = fetch([i for i, _ in new])
        self.store.write(
            entry.key,
            entry.root,
            entry.token_ids,
            entry.block_keys,
            {entry.block_keys[i]: rows[j] for j, (i, _) in enumerate(new)},
        )
        self._count_offload(self.disk, len(new), start)

    def _drop_disk(self, entry: TierEntry) -> None:
        assert self.store is not None
        self.store.delete(entry.key, self.disk.remove(entry.key))
        self.disk.counters.evictions += 1

    def _make_room(
        self, tier: TierStore, keys: Sequence[BlockHash], evict: Callable[[TierEntry], None]
    ) -> bool:
        """Evict the tier's LRU entries until keys fit; False if they never can."""
        if not tier.enabled or not tier.can_ever_hold(keys):
            return False
        while tier.num_new_blocks(keys) > tier.num_free:
            victim = tier.lru_victim()
            if victim is None:
                return False
            evict(victim)
        return True

    # ---- up: host or disk -> device ----------------------------------------------------------

    def restore(
        self,
        key: Hashable,
        history_ids: Sequence[int],
        scope: Hashable | None,
        loaded: LoadedSnapshot | SnapshotInvalid | None = None,
    ) -> tuple[Tier | None, bool]:
        """Before a turn: copy a thread's KV from the host or disk tier into device blocks.
        Returns (the tier it came from or None, whether a disk snapshot was refused). A disk
        snapshot the bridge did not read beforehand (`loaded`) is read here."""
        tier = self.where(key)
        if tier is Tier.HOST:
            entry = self.host.get(key)
            assert entry is not None and self.host_rows is not None
            start = time.perf_counter()
            entry.pinned = True  # not evicted to disk while device room is made for it
            fills = self.kv.adopt(key, entry.token_ids, scope=scope)
            entry.pinned = False
            if fills is not None:
                self.host_rows.restore(
                    [self.host.slot(entry.block_keys[i]) for i, _ in fills],
                    [b for _, b in fills],
                )
            self.host.remove(key)
            if fills is None:
                return None, False
            self._count_restore(self.host, len(fills), start)
            return Tier.HOST, False
        if tier is Tier.DISK:
            if loaded is None:
                self.pin_disk(key)
                loaded = self.load_from_disk(key, history_ids)
            return self._restore_from_disk(key, loaded, scope)
        return None, False

    def pin_disk(self, key: Hashable) -> bool:
        """A turn will read this thread's snapshot: keep it from eviction. False if not on disk."""
        entry = self.disk.get(key)
        if entry is None:
            return False
        entry.pinned = True
        return True

    def unpin_disk(self, key: Hashable) -> None:
        entry = self.disk.get(key)
        if entry is not None:
            entry.pinned = False

    def load_from_disk(
        self, key: Hashable, history_ids: Sequence[int]
    ) -> LoadedSnapshot | SnapshotInvalid:
        """Read and check a pinned thread's snapshot (any thread; no bookkeeping is touched)."""
        assert self.store is not None
        self.store.flush()  # its own snapshot may still be queued for writing
        try:
            return self.store.load(key, history_ids)
        except SnapshotInvalid as exc:
            return exc
        except OSError as exc:
            return SnapshotInvalid("missing", str(exc))

    def _restore_from_disk(
        self, key: Hashable, loaded: LoadedSnapshot | SnapshotInvalid, scope: Hashable | None
    ) -> tuple[Tier | None, bool]:
        assert self.store is not None
        entry = self.disk.get(key)
        if entry is None:  # forgotten meanwhile
            return None, False
        released = self.disk.remove(key)
        if isinstance(loaded, SnapshotInvalid):
            refused = self.disk.counters.refused
            refused[loaded.reason] = refused.get(loaded.reason, 0) + 1
            log.warning("KV snapshot of thread %s refused and deleted (%s)", key, loaded)
            self.store.delete(
                key, [*released, *[b for b in loaded.bad_blocks if b not in released]]
            )
            return None, True
        self.store.delete(key, released)
        start = time.perf_counter() - loaded.seconds
        fills = self.kv.adopt(key, loaded.token_ids, scope=scope)
        if fills is None:
            return None, False
        scatter_blocks(self.pool, [b for _, b in fills], loaded.rows[[i for i, _ in fills]])
        self._count_restore(self.disk, len(fills), start)
        return Tier.DISK, False

    # ---- the rest of a thread's life ---------------------------------------------------------

    def forget(self, key: Hashable) -> None:
        """The thread was deleted (or rewound): drop its KV from the host and disk tiers."""
        if key in self.host:
            self.host.remove(key)
        if key in self.disk:
            assert self.store is not None
            self.store.delete(key, self.disk.remove(key))

    def count_hit(self, tier: Tier) -> None:
        if tier is Tier.DEVICE:
            self.device_hits += 1
        elif tier is Tier.HOST:
            self.host.counters.hits += 1
        else:
            self.disk.counters.hits += 1

    def persist_all(self, timeout_s: float) -> bool:
        """Shutdown: write every thread held on host or device to disk, least recently used
        first (the disk's LRU keeps the most recent ones when it is full), and wait for the
        writes for at most timeout_s. The device pool is left as it is (the process ends)."""
        if self.store is None:
            return True
        for key in self.host.lru_keys():
            entry = self.host.get(key)
            if entry is not None and not entry.pinned:
                self._host_to_disk(entry)
        for key in self.kv.lru_order():
            entry = self.kv.peek(key)
            assert entry is not None
            root = entry.root if entry.root is not None else self._private_root(key)
            keys = content_keys(root, entry.token_ids, self.kv.block_size, entry.block_hashes)
            if key in self.disk:
                continue
            blocks = list(entry.block_table)
            self._to_disk(
                TierEntry(key, list(entry.token_ids), keys, root=root),
                lambda idx, blocks=blocks: gather_blocks(self.pool, [blocks[i] for i in idx]),
            )
        done = self.store.close(timeout_s)
        if not done:
            log.warning("KV snapshots not all written within %.0f s", timeout_s)
        return done

    def close(self) -> None:
        if self.store is not None:
            self.store.close(0)

    # ---- inspection --------------------------------------------------------------------------

    def stats(self) -> TierStats:
        kv_stats = self.kv.stats()
        device = TierState(
            threads=kv_stats.num_resident_threads,
            blocks=kv_stats.num_used_blocks,
            bytes=kv_stats.num_used_blocks * self.block_bytes,
            capacity_bytes=self.kv.num_blocks * self.block_bytes,
        )
        tiers = {"device": device}
        for store in (self.host, self.disk):
            tiers[store.tier.value] = TierState(
                threads=store.num_threads,
                blocks=store.num_blocks,
                bytes=store.num_blocks * self.block_bytes,
                capacity_bytes=store.capacity_blocks * self.block_bytes,
            )
        lower = {s.tier.value: s.counters for s in (self.host, self.disk)}
        return TierStats(
            tiers=tiers,
            hits={"device": self.device_hits, **{t: c.hits for t, c in lower.items()}},
            offloads={t: c.offloads for t, c in lower.items()},
            offload_bytes={t: c.offload_blocks * self.block_bytes for t, c in lower.items()},
            offload_seconds={t: c.offload_seconds for t, c in lower.items()},
            restores={t: c.restores for t, c in lower.items()},
            restore_bytes={t: c.restore_blocks * self.block_bytes for t, c in lower.items()},
            restore_seconds={t: c.restore_seconds for t, c in lower.items()},
            evictions={t: c.evictions for t, c in lower.items()},
            snapshots_refused=dict(self.disk.counters.refused),
        )

    def check_integrity(self) -> None:
        """Each tier's holder counts and budget; a thread is in one place at most."""
        self.host.check_integrity()
        self.disk.check_integrity()
        on_device = set(self.kv.threads())
        host, disk = set(self.host.lru_keys()), set(self.disk.lru_keys())
        assert not (host & disk), f"threads both on host and disk: {host & disk}"
        assert not (on_device & host), f"threads both on device and host: {on_device & host}"
        assert not (on_device & disk), f"threads both on device and disk: {on_device & disk}"
        if self.host_rows is not None:
            assert self.host.num_blocks * self.block_bytes <= self.host_rows.tensor.nbytes

    # ---- internals ---------------------------------------------------------------------------

    def _private_root(self, key: Hashable) -> BlockHash:
        """The chain seed of a thread outside sharing: its blocks are named for it alone."""
        return root_hash(self.kv.identity, ("thread", str(key)))

    def _count_offload(self, tier: TierStore, num_blocks: int, start: float) -> None:
        tier.counters.offloads += 1
        tier.counters.offload_blocks += num_blocks
        tier.counters.offload_seconds += time.perf_counter() - start

    def _count_restore(self, tier: TierStore, num_blocks: int, start: float) -> None:
        tier.counters.restores += 1
        tier.counters.restore_blocks += num_blocks
        tier.counters.restore_seconds += time.perf_counter() - start

    def _load_index(self) -> None:
        """At start: the snapshots on disk become the disk tier (oldest first, within budget)."""
        assert self.store is not None
        for info in self.store.scan():
            entry = TierEntry(
                info.key,
                list(info.token_ids or []),
                list(info.block_keys),
                root=info.root,
                broken=info.token_ids is None,
            )
            if not self._make_room(self.disk, entry.block_keys, self._drop_disk):
                self.store.delete(info.key, [k for k in entry.block_keys
                                             if not self.disk.holds_block(k)])  # fmt: skip
                continue
            self.disk.add(entry)
