"""The model runner's step tensors: the one place lists become tensors. On CUDA the same values
go through pinned host memory and a non-blocking copy (runner._tensor); here, on the CPU, their
values, dtypes and the padding are checked against the runner's docstring example."""

from __future__ import annotations

import torch
from engine_testing import random_ids, random_model

from app.engine.network.runner import ModelRunner
from app.engine.runtime.scheduler import ScheduledBatch
from app.engine.runtime.sequence import Sequence
from app.engine.runtime.types import SamplingParams


def sequence(seq_id: int, ids: list[int], num_cached: int, table: list[int]) -> Sequence:
    return Sequence(
        seq_id,
        f"t{seq_id}",
        ids,
        0,
        SamplingParams(max_tokens=4, temperature=0.0),
        block_table=table,
        num_cached_tokens=num_cached,
        miss_reason=None,
        decode=None,
        device=torch.device("cpu"),
    )


def test_prepare_builds_the_docstring_example():
    model = random_model()
    config = model.config
    kv = [
        tuple(torch.zeros(12, 4, config.num_kv_heads, config.head_dim) for _ in range(2))
        for _ in range(config.num_layers)
    ]
    runner = ModelRunner(model, kv, block_size=4)
    a = sequence(0, random_ids(8, seed=1), 5, [7, 2])  # 5 cached, 3 new: its prompt ends
    b = sequence(1, random_ids(10, seed=2), 0, [0, 5, 9])  # 0 cached, 4 of 10 new: no sample
    c = sequence(2, random_ids(10, seed=3), 9, [3, 8, 1])  # 9 cached, 1 new (a decode)
    prepared = runner.prepare(ScheduledBatch([a, b, c], [3, 4, 1]))

    assert prepared.input_ids.tolist() == a.token_ids[5:8] + b.token_ids[0:4] + c.token_ids[9:]
    assert prepared.positions.tolist() == [5, 6, 7, 0, 1, 2, 3, 9]
    meta = prepared.meta
    # slot = block_table[pos // 4] * 4 + pos % 4
    assert meta.slot_mapping.tolist() == [9, 10, 11, 0, 1, 2, 3, 5]
    # Only the blocks each sequence reaches this step, padded with block 0.
    assert meta.block_tables.tolist() == [[7, 2, 0], [0, 0, 0], [3, 8, 1]]
    assert meta.cu_seqlens_q.tolist() == [0, 3, 7, 8]
    assert meta.seq_lens.tolist() == [8, 4, 10]
    assert (meta.max_seqlen_q, meta.max_seqlen_k) == (4, 10)
    assert prepared.sample_rows.tolist() == [2, 7]
    assert prepared.sample_seq_index == [0, 2]
    # The dtypes the kernels' launchers require.
    assert meta.slot_mapping.dtype == torch.int64
    assert {meta.block_tables.dtype, meta.cu_seqlens_q.dtype, meta.seq_lens.dtype} == {torch.int32}
