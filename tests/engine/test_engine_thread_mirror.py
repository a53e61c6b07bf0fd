"""The CPU backend's thread mirror and its attention: against the paged-attention reference, step
after step, while threads come and go, turns roll back, blocks are reallocated under a row and
steps fail half way; and what each step copies out of the pool."""

from __future__ import annotations

import pytest
import torch

from app.engine.network.attention import row_attention as row_attention_module
from app.engine.network.attention.base import AttentionMetadata, StepOwners
from app.engine.network.attention.cpu_backend import CPUBackend
from app.engine.network.attention.row_attention import row_attention, row_attention_mask
from kernels.paged_attention_ref import paged_attention_ref

BLOCK_SIZE = 4
NUM_BLOCKS = 64
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 6, 2, 8
NUM_LAYERS = 2


@pytest.mark.parametrize("num_heads, num_kv_heads", [(6, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("q_len, seq_len", [(5, 13), (1, 9), (11, 11), (3, 3), (1, 1)])
@pytest.mark.parametrize("flash", [False, True])
def test_row_attention_is_the_reference(
    num_heads, num_kv_heads, q_len, seq_len, flash, monkeypatch
):
    """A chunk on a prefix, a decode, a first prefill: by products over head-major keys, or (past
    the scores' budget) by SDPA over them, the reference's attention."""
    if flash:
        monkeypatch.setattr(row_attention_module, "SCORES_BUDGET_BYTES", 0)
    gen = torch.Generator().manual_seed(q_len * 100 + seq_len + num_heads)
    k = torch.randn(seq_len, num_kv_heads, HEAD_DIM, generator=gen)
    v = torch.randn(seq_len, num_kv_heads, HEAD_DIM, generator=gen)
    q = torch.randn(q_len, num_heads, HEAD_DIM, generator=gen)
    # The reference reads one sequence of one block holding it all.
    table = torch.tensor([[0]])
    expected = paged_attention_ref(q, k[None], v[None], table, [0, q_len], [seq_len], 0.3)
    head_major_k = k.transpose(0, 1).contiguous()
    head_major_v = v.transpose(0, 1).contiguous()
    mask = row_attention_mask(q_len, seq_len, num_heads // num_kv_heads, q.device)
    got = row_attention(q, head_major_k, head_major_v, 0.3, mask)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


class Pool:
    """A CPU backend over a small pool whose contents a test writes as an engine step would,
    and a block allocator with generations."""

    def __init__(
        self, max_bytes: int | None = None, head_dim: int = HEAD_DIM, native: bool = True
    ) -> None:
        # HEAD_DIM (8) is no head size the C++ decode kernel is built for: decodes take torch's
        # products, whose paths these tests follow; 16 gives them to the kernel. `native`: the
        # C++ library writes each layer's rows (else torch's copies do).
        self.head_dim = head_dim
        self.gen = torch.Generator().manual_seed(0)
        shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, head_dim)
        self.caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(NUM_LAYERS)]
        self.backend = CPUBackend(self.caches, native_decode=native)
        if max_bytes is not None:
            self.backend.mirror.max_bytes = max_bytes
        self.generations = [0] * NUM_BLOCKS
        self.tables: dict[str, list[int]] = {}
        self.next_block = 0
        self.copied: list[int] = []  # positions each step copied into the mirror

    def grow(self, thread: str, length: int) -> list[int]:
        table = self.tables.setdefault(thread, [])
        while len(table) * BLOCK_SIZE < length:
            table.append(self.next_block)
            self.generations[self.next_block] += 1
            self.next_block += 1
        return table

    def step(
        self, seqs: list[tuple[str, int, int]], *, finish: bool = True, layers: int = NUM_LAYERS
    ) -> list[torch.Tensor]:
        """seqs: (thread, cached positions, new positions). Writes the new positions' KV into
        the pool, runs attention through the backend in `layers` layers, checks each against the
        reference, and returns the outputs."""
        cu, seq_lens, slots, tables = [0], [], [], []
        for thread, cached, new in seqs:
            table = self.grow(thread, cached + new)
            for p in range(cached, cached + new):
                slots.append(table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
            cu.append(cu[-1] + new)
            seq_lens.append(cached + new)
            tables.append(table)
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            block_tables=block_tables.int(),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            max_seqlen_q=max(new for _, _, new in seqs),
            max_seqlen_k=max(seq_lens),
        )
        owners = StepOwners(
            thread_keys=tuple(thread for thread, _, _ in seqs),
            block_tables=tables,
            block_generations=self.generations,
        )
        self.backend.prepare(
            meta,
            seq_ids=tuple(range(len(seqs))),
            cu_seqlens_q=cu,
            seq_lens=seq_lens,
            owners=owners,
        )
        step = self.backend.mirror_step
        self.copied.append(-1 if step is None else step.copy_slots.numel())
        outs = []
        for layer in range(layers):
            k_cache, v_cache = self.caches[layer]
            flat_k, flat_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
            flat_k[torch.tensor(slots)] = torch.randn(
                len(slots), NUM_KV_HEADS, self.head_dim, generator=self.gen
            )
            flat_v[torch.tensor(slots)] = torch.randn(
                len(slots), NUM_KV_HEADS, self.head_dim, generator=self.gen
            )
            q = torch.randn(cu[-1], NUM_HEADS, self.head_dim, generator=self.gen)
            got = self.backend.forward(q, k_cache, v_cache, meta, 0.35, layer)
            want = paged_attention_ref(q, k_cache, v_cache, block_tables, cu, seq_lens, 0.35)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            outs.append(got)
        if finish:
            self.backend.finish_step()
        return outs


@pytest.mark.parametrize("native", [True, False])
def test_threads_turn_after_turn_copy_only_their_new_tokens(native):
    pool = Pool(native=native)
    pool.step([("a", 0, 9)])  # a first prefill
    for n in range(9, 12):
        pool.step([("a", n, 1)])  # decodes
    pool.step([("a", 12, 5), ("b", 0, 7)])  # a's next turn (a chunk on its history), b joins
    pool.step([("a", 17, 1), ("b", 7, 1)])
    pool.step([("b", 8, 1)])  # a's turn ended: b decodes alone, a's row stays
    pool.step([("c", 0, 3), ("b", 9, 1)])  # a new thread beside b
    pool.step([("b", 10, 1), ("a", 17, 4), ("c", 3, 1)])  # a comes back, rows out of order
    assert pool.copied == [9, 1, 1, 1, 12, 2, 1, 4, 6]
    assert pool.backend.mirror.row_length("a") == 21


def test_decodes_by_the_kernel_read_their_own_rows_in_any_step():
    """With the C++ kernel (float32, a head size it is built for): a step of decodes reads each
    sequence's own row, in any order and of any length, and the decodes of a step with prefill
    chunks go to it together; every step checked against the reference."""
    pool = Pool(head_dim=16)
    backend = pool.backend
    assert backend.decode_kernel is not None
    pool.step([("long", 0, 40), ("s1", 0, 3), ("s2", 0, 3)])
    pool.step([("s2", 3, 1), ("long", 40, 1), ("s1", 3, 1)])  # out of order, one long row
    assert backend._native_rows is not None and backend._native_index is None
    assert backend._decode_mask is None
    pool.step([("s1", 4, 1), ("new", 0, 6), ("long", 41, 1)])  # decodes beside a prefill
    assert backend._native_index is not None and backend._native_index.tolist() == [0, 7]
    pool.step([("new", 6, 5)])  # a chunk alone: no decodes for the kernel
    assert backend._native_rows is None


def test_decodes_of_one_long_thread_among_short_ones_read_each_row_alone():
    """Padding every row to the longest would read more than twice the real keys: each
    sequence attends over its own row instead of one batched product (the same attention)."""
    pool = Pool()
    pool.step([("long", 0, 40), ("s1", 0, 3), ("s2", 0, 3)])
    pool.step([("long", 40, 1), ("s1", 3, 1), ("s2", 3, 1)])
    assert pool.backend.mirror_step is not None and pool.backend._decode_mask is None
    pool.step([("s1", 4, 1), ("s2", 4, 1)])  # the short ones alone (and long's row): batched
    assert pool.backend._decode_mask is not None


@pytest.mark.parametrize("native", [True, False])
def test_a_rolled_back_turn_is_copied_again_from_where_it_was_cut(native):
    pool = Pool(native=native)
    pool.step([("a", 0, 10)])
    pool.step([("a", 10, 6)])  # a turn that is then rolled back: positions 10.. recomputed
    pool.step([("a", 10, 3)])  # cached 10: the row is current only up to there
    assert pool.copied == [10, 6, 3]
    pool.step([("a", 13, 1)])
    assert pool.backend.mirror.row_length("a") == 14


@pytest.mark.parametrize("native", [True, False])
def test_a_block_reallocated_under_a_row_is_copied_again(native):
    """The thread's KV moved down a tier and came back in other blocks, or the same block ids
    handed out again: the row is current only up to the first block that is not the same."""
    pool = Pool(native=native)
    pool.step([("a", 0, 10)])
    pool.step([("a", 10, 1)])
    table = pool.tables["a"]
    pool.generations[table[1]] += 1  # block 1 freed and allocated again (same id)
    for layer in range(NUM_LAYERS):  # ... and written with other KV
        for cache in pool.caches[layer]:
            cache[table[1]] = torch.randn(cache[table[1]].shape, generator=pool.gen)
    pool.step([("a", 11, 1)])  # checked against the reference: reads the new block 1
    assert pool.copied[-1] == 12 - BLOCK_SIZE  # from block 1 on
    pool.tables["a"] = [50, 51, 52]  # restored into other blocks, written there
    for p in range(12):
        for layer in range(NUM_LAYERS):
            for cache in pool.caches[layer]:
                cache[50 + p // BLOCK_SIZE, p % BLOCK_SIZE] = torch.randn(
                    NUM_KV_HEADS, HEAD_DIM, generator=pool.gen
                )
    for block in (50, 51, 52):
        pool.generations[block] += 1
    pool.step([("a", 12, 1)])
    assert pool.copied[-1] == 13


@pytest.mark.parametrize("native", [True, False])
def test_a_step_that_failed_half_way_leaves_rows_that_are_copied_again(native):
    pool = Pool(native=native)
    pool.step([("a", 0, 9)])
    pool.step([("a", 9, 4), ("b", 0, 5)], finish=False, layers=1)  # failed after layer 0
    pool.step([("a", 9, 4), ("b", 0, 5)])  # the retry: a from its old length, b from scratch
    assert pool.copied[-1] == 4 + 5
    pool.step([("a", 13, 1), ("b", 5, 1)])
    assert pool.copied[-1] == 2


def test_past_its_memory_the_mirror_gives_way_or_steps_read_the_pool():
    per_position = NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_DIM * 4
    pool = Pool(max_bytes=per_position * 24)
    mirror = pool.backend.mirror
    pool.step([("a", 0, 9)])  # a row of capacity 24 (its headroom cut to the budget)
    assert (mirror.num_rows, mirror.capacity) == (1, 24)
    pool.step([("b", 0, 9)])  # two rows of 12: a's stays
    assert (mirror.num_rows, mirror.capacity) == (2, 12)
    assert mirror.row_length("a") == 9
    pool.step([("c", 0, 9)])  # three rows would not hold 9 each: a, least recent, gives way
    assert mirror.row_length("a") == 0 and mirror.row_length("b") == 9
    pool.step([("a", 9, 2), ("b", 9, 1)])  # now c gives way; a is copied from scratch
    assert pool.copied[-1] == 11 + 1
    pool.step([("a", 11, 15)])  # 26 positions: more than the budget, the pool's own paths
    assert pool.copied[-1] == -1
    pool.step([("b", 10, 1)])  # b's row is still current
    assert pool.copied[-1] == 1
    pool.step([("a", 26, 1)])  # still past the budget
    assert pool.copied[-1] == -1


def test_steps_without_owners_read_the_pool():
    """Callers that do not say whose the KV is (the reference's own tests) get the pool's paths."""
    pool = Pool()
    backend = pool.backend
    table = pool.grow("a", 9)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(9),
        block_tables=torch.tensor([table], dtype=torch.int32),
        cu_seqlens_q=torch.tensor([0, 9], dtype=torch.int32),
        seq_lens=torch.tensor([9], dtype=torch.int32),
        max_seqlen_q=9,
        max_seqlen_k=9,
    )
    backend.prepare(meta, seq_ids=(0,), cu_seqlens_q=[0, 9], seq_lens=[9])
    assert backend.mirror_step is None


@pytest.mark.parametrize("num_blocks", [64, 10])  # roomy; a thread evicted and recomputed
def test_the_engine_through_the_mirror_gives_the_pools_logits(num_blocks):
    """Turns of three threads with changing batches, through the mirror and through the pool's
    own paths (a runner not told whose the KV is): the same logits, step after step. Each later
    turn leaves the last reply out of its history, so the thread's KV is cut back to the common
    prefix (a mismatch) and its row is current only up to there."""
    from app.engine.runtime.llm_engine import LLMEngine
    from tests.engine.engine_testing import play_changing_batches, random_model

    model = random_model()
    engines = [
        LLMEngine(model, num_blocks=num_blocks, block_size=4, max_num_seqs=3, check_invariants=True)
        for _ in range(2)
    ]
    engines[1].runner.block_generations = None
    mirrored, pooled = (play_changing_batches(engine) for engine in engines)
    assert engines[0].runner.attn.mirror.nbytes > 0 and engines[1].runner.attn.mirror.nbytes == 0
    assert len(mirrored) == len(pooled)
    for got, want in zip(mirrored, pooled, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if num_blocks == 10:
        assert engines[0].kv.stats().evictions > 0


def test_new_threads_take_spare_rows_or_long_idle_ones_before_the_rows_grow(monkeypatch):
    from app.engine.network.attention import thread_mirror

    monkeypatch.setattr(thread_mirror, "IDLE_STEPS", 3)
    spare = thread_mirror.SPARE_ROWS
    pool = Pool(max_bytes=1 << 20)  # room for many rows
    mirror = pool.backend.mirror
    pool.step([("a", 0, 5), ("b", 0, 5)])  # rows for a and b, and some to spare
    assert mirror.num_rows == 2 + spare
    pool.step([("c", 0, 5), ("b", 5, 1)])  # a idle for one step only: c takes a spare row
    assert mirror.row_length("a") == 5 and mirror.num_rows == 2 + spare
    for n in range(6, 9):
        pool.step([("b", n, 1), ("c", n - 1, 1)])
    pool.step([("d", 0, 5), ("b", 9, 1)])  # a idle for 4 steps: d takes its row, the lowest
    assert mirror.row_length("a") == 0 and mirror.row_length("d") == 5
    assert mirror.num_rows == 2 + spare
    # Two new threads, one spare row left: the rows grow once, with rows to spare again.
    pool.step([("e", 0, 5), ("f", 0, 5), ("b", 10, 1)])
    grown = mirror.num_rows
    assert grown == 2 + spare + 1 + spare
    pool.step([("g", 0, 5), ("b", 11, 1)])
    assert mirror.num_rows == grown


def test_rows_to_spare_never_cut_the_capacity():
    """Within a tight budget the rows grow only by the new threads: spare rows would have cut
    the capacity the existing rows use."""
    per_position = NUM_LAYERS * 2 * NUM_KV_HEADS * HEAD_DIM * 4
    pool = Pool(max_bytes=per_position * 48)
    mirror = pool.backend.mirror
    pool.step([("a", 0, 9)])  # one row; spare rows would leave less than 24 positions each
    pool.step([("b", 0, 9), ("a", 9, 1)])
    assert mirror.num_rows == 2 and mirror.capacity == 24
    assert mirror.row_length("a") == 10 and mirror.row_length("b") == 9


def test_decodes_of_rows_past_the_first_read_their_own_range():
    """Threads that came later sit in later rows: their decodes read that range alone, as it
    stands (in order) or with the queries moved to their rows (out of order)."""
    pool = Pool()
    pool.step([("a", 0, 6), ("b", 0, 6)])
    pool.step([("c", 0, 6), ("d", 0, 6)])
    pool.step([("c", 6, 1), ("d", 6, 1)])
    step = pool.backend.mirror_step
    assert (step.first_row, step.end_row, step.rows) == (2, 4, [2, 3])
    assert pool.backend._decode_mask is not None and pool.backend._row_index is None
    pool.step([("d", 7, 1), ("c", 7, 1)])
    assert pool.backend._decode_mask is not None and pool.backend._row_index is not None
