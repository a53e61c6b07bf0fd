"""The step's block tables from one persistent device table: per step only new blocks travel.

A sequence keeps one row while it is scheduled step after step; its table (a plain int list the
KV manager owns) only grows then, so each step writes just the blocks it reaches for the first
time, and the step's [B, M] table is a gather of the batch's rows:

    persistent [rows, cols] int32      row r: entries [0, num_written) of its sequence's table,
    r0: 7 2 0 0 ...  (seq A)           zeros past them
    r1: 3 8 1 0 ...  (seq C)           step table = persistent[:, :M].index_select(0, [r0, r1])

A row is rewritten from scratch whenever its sequence did not simply go on where the last step
left it: another table object, a table shorter than what was written, a last written block that
changed, or a step that does not start where the previous one ended (preemption, rollback,
truncation: each loses KV, so the sequence restarts below its previous end; the KV manager
changes a running sequence's table in no other way). A sequence absent
from a step gives its row back; rows and columns grow by doubling when needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def extend_slots(slots: list[int], table: list[int], start: int, end: int, block_size: int) -> None:
    """Append the pool slots of positions [start, end) of a sequence with block table `table`:
    block by block, a run of consecutive slots per block touched."""
    for block_index in range(start // block_size, (end - 1) // block_size + 1):
        base = table[block_index] * block_size - block_index * block_size
        lo = max(start, block_index * block_size)
        hi = min(end, (block_index + 1) * block_size)
        slots.extend(range(base + lo, base + hi))


@dataclass
class _Row:
    index: int
    table: list[int]  # the very list written from (identity, not equality, is checked)
    num_written: int  # leading entries of the row that hold this table's blocks
    end: int  # the sequence's length after the step that last wrote the row
    last: int = -1  # table[num_written - 1] when written


class DeviceBlockTable:
    """Persistent rows of block ids per sequence id. `build` returns the step's padded table,
    equal to the one rebuilt from the lists, with one upload of the new entries and row ids."""

    def __init__(
        self,
        device: torch.device,
        upload: Callable[[list[int], torch.dtype], torch.Tensor],
        *,
        num_rows: int = 8,
        num_cols: int = 64,
    ) -> None:
        self.device = device
        self._upload = upload  # host ints -> device tensor (pinned + non-blocking on CUDA)
        self.table = torch.zeros(num_rows, num_cols, dtype=torch.int32, device=device)
        self._rows: dict[int, _Row] = {}  # seq_id -> its row
        self._free = list(range(num_rows - 1, -1, -1))
        self._dirty = [0] * num_rows  # per row: entries past which it holds only zeros
        self.num_rewrites = 0  # rows written from scratch for a sequence seen before (tests)

    def build(
        self,
        seq_ids: list[int],
        tables: list[list[int]],
        num_blocks: list[int],
        starts: list[int],
        ends: list[int],
    ) -> torch.Tensor:
        """[B, M] int32: row b holds tables[b][:num_blocks[b]], zero-padded to M = the largest
        count. starts/ends: the tokens the step covers, to tell growth from a restart."""
        max_blocks = max(num_blocks)
        if max_blocks > self.table.shape[1]:
            self._grow(self.table.shape[0], max_blocks)
        for seq_id in self._rows.keys() - set(seq_ids):
            row = self._rows.pop(seq_id)
            self._free.append(row.index)
        num_cols = self.table.shape[1]
        index: list[int] = []  # flat positions in the table
        values: list[int] = []
        row_ids: list[int] = []
        for seq_id, table, count, start, end in zip(
            seq_ids, tables, num_blocks, starts, ends, strict=True
        ):
            row = self._rows.get(seq_id)
            if row is not None and not (
                row.table is table
                and row.end == start
                and len(table) >= row.num_written
                and (row.num_written == 0 or table[row.num_written - 1] == row.last)
            ):
                self.num_rewrites += 1
                self._free.append(row.index)
                row = None
            if row is None:
                if not self._free:
                    self._grow(2 * self.table.shape[0], num_cols)
                row = _Row(self._free.pop(), table, 0, start)
                self._rows[seq_id] = row
                base = row.index * num_cols
                dirty = self._dirty[row.index]
                if dirty > count:  # blocks written before, past this table's: zero them
                    index.extend(range(base + count, base + dirty))
                    values.extend([0] * (dirty - count))
                self._dirty[row.index] = 0
            if count > row.num_written:
                base = row.index * num_cols
                index.extend(range(base + row.num_written, base + count))
                values.extend(table[row.num_written : count])
                row.num_written = count
                row.last = table[count - 1]
                self._dirty[row.index] = count
            row.end = end
            row_ids.append(row.index)
        num_updates = len(index)
        host = self._upload(index + values + row_ids, torch.int32)
        if num_updates:
            self.table.view(-1).index_put_(
                (host[:num_updates],), host[num_updates : 2 * num_updates]
            )
        return self.table[:, :max_blocks].index_select(0, host[2 * num_updates :])

    def _grow(self, num_rows: int, num_cols: int) -> None:
        num_cols = max(num_cols, 1 << (num_cols - 1).bit_length())
        old = self.table
        self.table = torch.zeros(num_rows, num_cols, dtype=torch.int32, device=self.device)
        self.table[: old.shape[0], : old.shape[1]] = old
        self._free.extend(range(num_rows - 1, old.shape[0] - 1, -1))
        self._dirty.extend([0] * (num_rows - old.shape[0]))
