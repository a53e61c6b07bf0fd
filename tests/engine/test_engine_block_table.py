"""The persistent device block table (network/block_table.py) against tables rebuilt from the
lists every step: random schedules with growth, skipped steps, preemption, rollback, a swapped
last block, a replaced table (fork), failed steps and finished sequences, from tiny starting
sizes so rows and columns grow; block ids drawn from a small range so stale entries would show."""

from __future__ import annotations

import random

import pytest
import torch

from app.engine.network.block_table import DeviceBlockTable

BS = 4


def rebuilt(tables: list[list[int]], num_blocks: list[int]) -> torch.Tensor:
    width = max(num_blocks)
    rows = [t[:n] + [0] * (width - n) for t, n in zip(tables, num_blocks, strict=True)]
    return torch.tensor(rows, dtype=torch.int32)


class FakeSeq:
    def __init__(self, seq_id: int, rng: random.Random) -> None:
        self.seq_id = seq_id
        self.table: list[int] = [rng.randrange(12) for _ in range(rng.randrange(3))]
        self.num_cached = rng.randrange(len(self.table) * BS + 1)


def upload(values: list[int], dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


@pytest.mark.parametrize("seed", range(12))
def test_persistent_rows_equal_the_rebuilt_table(seed):
    rng = random.Random(seed)
    dbt = DeviceBlockTable(torch.device("cpu"), upload, num_rows=2, num_cols=2)
    next_id = 0
    live: list[FakeSeq] = []
    for _ in range(300):
        while len(live) < 6 and rng.random() < 0.5:
            live.append(FakeSeq(next_id, rng))
            next_id += 1
        batch = [s for s in live if rng.random() < 0.8] or live[:1]
        if not batch:
            continue
        starts, ends, num_blocks = [], [], []
        for seq in batch:
            start = seq.num_cached
            end = start + rng.choice([1, 1, 1, 2, 5, 11])
            need = -(-end // BS) + rng.choice([0, 0, 1])  # sometimes reserved past the step
            seq.table.extend(rng.randrange(12) for _ in range(need - len(seq.table)))
            starts.append(start)
            ends.append(end)
            num_blocks.append(min(len(seq.table), -(-end // BS)))
        tables = [s.table for s in batch]
        got = dbt.build([s.seq_id for s in batch], tables, num_blocks, starts, ends)
        assert torch.equal(got, rebuilt(tables, num_blocks))
        if rng.random() < 0.05:
            continue  # the step failed: nothing was computed
        for seq, end in zip(batch, ends, strict=True):
            seq.num_cached = end
        for seq in list(live):
            event = rng.random()
            if event < 0.03:  # preemption: every block goes, everything is recomputed
                del seq.table[:]
                seq.num_cached = 0
            elif event < 0.06:  # rollback / truncation: KV kept up to a point, in place
                seq.num_cached = rng.randrange(seq.num_cached + 1)
                del seq.table[-(-seq.num_cached // BS) :]
                if seq.table and seq.num_cached % BS and rng.random() < 0.5:
                    seq.table[-1] = rng.randrange(12)  # a shared partial block copied
            elif event < 0.08:  # a new list (fork-like), same sequence id
                seq.table = list(seq.table)
                if seq.table:
                    seq.table[0] = rng.randrange(12)
            elif event < 0.11:
                live.remove(seq)  # finished
    assert dbt.table.shape[0] > 2 and dbt.table.shape[1] > 2  # both grew
    assert dbt.num_rewrites > 0


def test_a_decode_step_uploads_only_the_row_ids():
    sent: list[list[int]] = []

    def record(values, dtype):
        sent.append(list(values))
        return upload(values, dtype)

    dbt = DeviceBlockTable(torch.device("cpu"), record, num_rows=4, num_cols=8)
    a, b = [5, 6, 7], [1, 2]
    dbt.build([0, 1], [a, b], [3, 2], [0, 0], [9, 5])  # prefills: every block travels
    assert len(sent[-1]) == 2 * 5 + 2
    dbt.build([0, 1], [a, b], [3, 2], [9, 5], [10, 6])  # decodes within their last blocks
    assert sent[-1] == [0, 1]  # only the rows
    b.append(3)
    got = dbt.build([0, 1], [a, b], [3, 3], [10, 6], [11, 9])
    assert sent[-1] == [1 * 8 + 2, 3, 0, 1]  # b's new block: one position, one value
    assert got.tolist() == [[5, 6, 7], [1, 2, 3]]
