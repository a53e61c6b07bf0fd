"""CPU attention's copy of the threads' keys and values: head-major, kept across steps and turns.

The paged pool stores a layer's keys as [block, slot in block, Hkv, D]: one KV head's keys are
strided, and a thread's may stand in blocks anywhere in the pool. Attention on the CPU reads them
best as one contiguous [S, D] matrix per KV head (row_attention.py: oneDNN's products take only
those; a batch of decodes is one batched product over them). The mirror keeps, per layer,

    keys, values: [R, Hkv, capacity, D]     a row per thread, positions 0.. of its KV

Each step syncs the rows of the step's threads from the pool (where store_kv has just written the
step's new tokens), copying only what the row lacks: a thread that goes on where its row stopped
(a decode, the next chunk, its next turn) copies its new tokens and nothing of its history. So a
turn's prefill reads its history in place and the decodes after it find it ready; a row is filled
from scratch only for a thread new to the mirror, or whose KV changed under it.

When a row is current. The pool stays the one source of truth; a row records the block ids it
was synced from and their allocation generations (BlockPool.generations). A block's KV does not
change while its id and generation stay the same (its holder writes only past what it had
computed), so on its thread's next step a row is current up to the first block that differs, and
never past the step's cached prefix (a rolled-back or rewound turn recomputes from there):

    valid = min(row's synced length, step's cached prefix, blocks still the same x block size)

and positions [valid, seq_len) are copied from the pool. A step counts only once the forward pass
finished (`commit`): a pass that failed half way leaves some layers synced and others not, so its
rows keep their old length, and a row taken for a new thread holds nothing until then.

Memory: rows share one capacity (doubled, with headroom, when a thread outgrows it) and stay
within `max_bytes` (the pool's own size), rows of threads not in the step giving way, least
recently used first; a step that still does not fit is not mirrored (`begin_step` returns None,
the caller reads the pool itself) and the rows stay current for later steps. A new thread takes
the row of one idle for IDLE_STEPS steps rather than adding one, so the rows follow the threads in
use, not every thread ever served. Growing copies every row of every layer (a new thread beside
eight of 2,000 tokens waited 0.2-0.9 s for it, where its prefill takes 35 ms), so the storage
grows ahead of need: rows to half again as many, and at least SPARE_ROWS beyond the new threads,
where the budget allows that without cutting the capacity; the capacity to twice the old one.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from app.engine.network.block_table import extend_slots

HEADROOM_TOKENS = 256  # room to grow before the capacity is raised
IDLE_STEPS = 512  # a row unused for this many steps goes to a new thread before the rows grow
GROWTH = 2.0  # a raised capacity is at least this times the old one
ROW_GROWTH = 1.5  # rows added to hold new threads: up to this times the old count ...
SPARE_ROWS = 2  # ... and at least this many beyond the new threads (where the budget allows)


@dataclass
class _Row:
    thread_key: Hashable
    length: int = 0  # positions [0, length) equal the pool's, as of `blocks`
    blocks: list[int] = field(default_factory=list)  # the thread's table when synced
    generations: list[int] = field(default_factory=list)  # those blocks' generations then
    last_used: int = 0  # the step that used it last (least recently used rows give way)


@dataclass(frozen=True)
class MirrorStep:
    """What the layers of one step need from the mirror."""

    mirror: ThreadMirror
    rows: list[int]  # per sequence of the step, its row
    copy_rows: torch.Tensor  # [n] int64, the row of each position copied from the pool
    copy_positions: torch.Tensor  # [n] int64, its position in the row
    copy_slots: torch.Tensor  # [n] int64, its slot in the pool

    @property
    def first_row(self) -> int:
        """Rows [first_row, end_row) cover every row of the step."""
        return min(self.rows)

    @property
    def end_row(self) -> int:
        return max(self.rows) + 1

    @property
    def in_order(self) -> bool:
        """rows == first_row, first_row + 1, ...: a step of decodes reads them as they stand."""
        return self.rows == list(range(self.rows[0], self.rows[0] + len(self.rows)))

    def sync_layer(
        self, layer: int, k_cache: torch.Tensor, v_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy what the step's rows lack from this layer's pool (which holds the step's new
        keys and values already); returns the layer's [R, Hkv, capacity, D] keys and values."""
        keys, values = self.mirror.layer(layer)
        if self.copy_slots.numel():
            for cache, buffer in ((k_cache, keys), (v_cache, values)):
                new = cache.flatten(0, 1).index_select(0, self.copy_slots)  # [n, Hkv, D]
                buffer[self.copy_rows, :, self.copy_positions] = new
        return keys, values


class ThreadMirror:
    """Per-layer head-major keys/values of the threads the CPU backend serves; owned by it."""

    def __init__(self, num_layers: int, max_bytes: int) -> None:
        self.num_layers = num_layers
        self.max_bytes = max_bytes
        self._storage: list[torch.Tensor] = []  # per layer [2, R, Hkv, capacity, D]
        self._rows: list[_Row | None] = []
        self._row_of: dict[Hashable, int] = {}
        self._capacity = 0
        self._steps = 0
        # The step planned and not yet committed, per sequence: its row and what the row will
        # hold then (length, blocks, their generations; a running sequence's blocks do not
        # change during its step).
        self._pending: list[tuple[int, _Row]] | None = None

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def num_rows(self) -> int:
        return len(self._rows)

    def row_length(self, thread_key: Hashable) -> int:
        """Positions of the thread's KV the mirror holds as current (0: none); for tests."""
        row = self._row_of.get(thread_key)
        return 0 if row is None else self._rows[row].length  # type: ignore[union-attr]

    def begin_step(
        self,
        thread_keys: Sequence[Hashable],
        tables: Sequence[list[int]],
        cached_lens: Sequence[int],  # per sequence, positions computed before this step
        seq_lens: Sequence[int],  # per sequence, positions after it
        block_size: int,
        generations: Sequence[int],  # BlockPool.generations
        like: torch.Tensor,  # a layer's pool [N, bs, Hkv, D]: dtype, device, Hkv, D
    ) -> MirrorStep | None:
        """Plan a step: a row for every sequence, what each must copy from the pool. None when
        the step's rows would not fit in max_bytes (nothing changes then)."""
        if self._pending is not None:  # the last step never finished: its rows hold nothing new
            self._abandon()
        in_step = set(thread_keys)
        if len(in_step) != len(thread_keys):
            return None  # two sequences of one thread in one step: not the engine's way
        if not self._make_room(in_step, max(seq_lens), like):
            return None
        self._steps += 1
        rows, pending = [], []
        copy_rows: list[int] = []
        copy_positions: list[int] = []
        copy_slots: list[int] = []
        for key, table, cached, end in zip(thread_keys, tables, cached_lens, seq_lens, strict=True):
            row = self._row_of.get(key)
            if row is None:
                row = self._take_row(key, in_step)
            entry = self._rows[row]
            assert entry is not None
            entry.last_used = self._steps
            start = min(cached, self._current_length(entry, table, block_size, generations))
            extend_slots(copy_slots, table, start, end, block_size)
            copy_positions.extend(range(start, end))
            copy_rows.extend([row] * (end - start))
            rows.append(row)
            blocks = table[: -(-end // block_size)]
            synced = _Row(key, end, blocks, _generations_of(generations, blocks), self._steps)
            pending.append((row, synced))
        self._pending = pending
        device = like.device
        return MirrorStep(
            mirror=self,
            rows=rows,
            copy_rows=torch.tensor(copy_rows, dtype=torch.int64, device=device),
            copy_positions=torch.tensor(copy_positions, dtype=torch.int64, device=device),
            copy_slots=torch.tensor(copy_slots, dtype=torch.int64, device=device),
        )

    def commit(self) -> None:
        """The planned step's forward pass finished: its rows now hold their sequences' KV."""
        for row, synced in self._pending or ():
            self._rows[row] = synced
        self._pending = None

    def reset(self) -> None:
        """Forget every row (the storage stays for reuse)."""
        self._rows = [None] * len(self._rows)
        self._row_of.clear()
        self._pending = None

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        storage = self._storage[layer]
        return storage[0], storage[1]

    @property
    def nbytes(self) -> int:
        return sum(s.numel() * s.element_size() for s in self._storage)

    # -- planning -------------------------------------------------------------------------

    @staticmethod
    def _current_length(
        entry: _Row, table: list[int], block_size: int, generations: Sequence[int]
    ) -> int:
        """How much of the row still equals the pool: up to the first block of the thread's
        table that is not the one synced (by id and generation)."""
        if entry.length == 0:
            return 0
        n = len(entry.blocks)
        if table[:n] == entry.blocks and _generations_of(generations, table[:n]) == (
            entry.generations
        ):
            return entry.length  # the common case, compared in C
        same = 0
        for block, old, gen in zip(table, entry.blocks, entry.generations, strict=False):
            if block != old or generations[block] != gen:
                break
            same += 1
        return min(entry.length, same * block_size)

    def _spare_rows(self, in_step: set[Hashable]) -> list[int]:
        """Rows a new thread may take without the storage growing: free ones, and those of
        threads idle for IDLE_STEPS (most likely done: the storage would otherwise hold every
        thread ever seen), lowest first."""
        idle_before = self._steps - IDLE_STEPS
        return [
            i
            for i, r in enumerate(self._rows)
            if r is None or (r.last_used < idle_before and r.thread_key not in in_step)
        ]

    def _take_row(self, key: Hashable, in_step: set[Hashable]) -> int:
        """A row for a thread new to the mirror: the lowest spare one (so that threads that come
        together sit together: a step of decodes reads one range of rows), else the least
        recently used of the threads not in this step (there is one: _make_room counted them)."""
        candidates = self._spare_rows(in_step)
        if candidates:
            row = candidates[0]
        else:
            row = min(
                (
                    i
                    for i, r in enumerate(self._rows)
                    if r is not None and r.thread_key not in in_step
                ),
                key=lambda i: self._rows[i].last_used,  # type: ignore[union-attr]
            )
        taken = self._rows[row]
        if taken is not None:
            del self._row_of[taken.thread_key]
        self._rows[row] = _Row(key)
        self._row_of[key] = row
        return row

    def _make_room(self, in_step: set[Hashable], longest: int, like: torch.Tensor) -> bool:
        """Storage with a row for every thread of the step and room for its longest sequence,
        within max_bytes: resized if need be (the rows keep their contents; more rows may mean
        less capacity), else its rows of other threads given way, else started over with the
        step's threads alone. Rows grow with some to spare where that leaves the capacity they
        would have had without them; a raised capacity has headroom, as much as the budget
        allows. False when nothing fits."""
        new_threads = sum(1 for key in in_step if key not in self._row_of)
        spare = len(self._spare_rows(in_step))
        same_dtype = bool(self._storage) and self._storage[0].dtype == like.dtype
        held = len(self._rows) if same_dtype else 0
        needed = held + max(0, new_threads - spare)
        choices = (
            (needed, same_dtype),  # grow: every row stays
            (max(held, len(in_step)), same_dtype),  # rows of other threads give way
            (len(in_step), False),  # the step's threads alone
        )
        for rows, keep in choices:
            capacity = self._capacity_for(rows, keep, longest, like)
            if capacity is None:
                continue
            if rows == needed > held:  # growing: rows to spare, unless they cost capacity
                ahead = max(int(held * ROW_GROWTH), needed + SPARE_ROWS)
                if (self._capacity_for(ahead, keep, longest, like) or 0) >= capacity:
                    rows = ahead
            if not keep or (rows, capacity) != (held, self._capacity):
                self._resize(rows, capacity, like, keep=keep)
            return True
        return False

    def _capacity_for(self, rows: int, keep: bool, longest: int, like: torch.Tensor) -> int | None:
        """The capacity `rows` rows would have within max_bytes (kept if it holds `longest`,
        else raised, with headroom); None where `longest` does not fit."""
        block = like.shape[1]
        room = self.max_bytes // (self._bytes(1, 1, like) * rows) // block * block
        capacity = min(self._capacity, room) if keep else 0
        if longest > capacity:
            wanted = max(longest + HEADROOM_TOKENS, int(capacity * GROWTH))
            capacity = min(-(-wanted // block) * block, room)
        return capacity if capacity >= longest else None

    def _bytes(self, rows: int, capacity: int, like: torch.Tensor) -> int:
        _, _, num_kv_heads, head_dim = like.shape
        per_layer = 2 * rows * num_kv_heads * capacity * head_dim
        return self.num_layers * per_layer * like.element_size()

    def _resize(self, rows: int, capacity: int, like: torch.Tensor, *, keep: bool) -> None:
        """Storage of `rows` rows (at least as many as now, with `keep`) of `capacity` positions
        per layer. With `keep` each layer's rows are copied in (a row longer than a smaller
        capacity keeps its first `capacity` positions); else every row is forgotten."""
        _, _, num_kv_heads, head_dim = like.shape
        if not keep:
            self._storage = []  # let the old storage go before the new is made
            self.reset()
            self._rows = []
        old_rows, kept = len(self._rows), min(capacity, self._capacity)
        for layer in range(self.num_layers):
            fresh = torch.empty(
                2, rows, num_kv_heads, capacity, head_dim, dtype=like.dtype, device=like.device
            )
            # Written once: the rows kept, zeros elsewhere (torch's batched decode path reads a
            # few positions past a row's length, masked, so they must be finite).
            if keep:
                fresh[:, :old_rows, :, :kept] = self._storage[layer][:, :, :, :kept]
                fresh[:, :old_rows, :, kept:].zero_()
                fresh[:, old_rows:].zero_()
                self._storage[layer] = fresh  # the old one goes before the next layer's is made
            else:
                self._storage.append(fresh.zero_())
        for entry in self._rows:
            if entry is not None:
                entry.length = min(entry.length, capacity)
        self._rows.extend([None] * (rows - old_rows))
        self._capacity = capacity

    def _abandon(self) -> None:
        """A step that never committed: its rows may hold some layers' new KV and not others'.
        Rows it took for new threads hold nothing; the others keep their old length (the
        positions it wrote past it are copied again)."""
        for row, _ in self._pending or ():
            entry = self._rows[row]
            if entry is not None and entry.length == 0:
                del self._row_of[entry.thread_key]
                self._rows[row] = None
        self._pending = None


def _generations_of(generations: Sequence[int], blocks: list[int]) -> list[int]:
    if not blocks:
        return []
    if len(blocks) == 1:
        return [generations[blocks[0]]]
    return list(operator.itemgetter(*blocks)(generations))
