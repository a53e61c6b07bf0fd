"""The CPU decode mirror: decodes that append to it give the logits of gathering from the pool."""

from __future__ import annotations

import torch
from engine_testing import LogitsLog, random_ids, random_model, run_to_finish

from app.engine.network.attention import decode_mirror
from app.engine.network.attention.decode_mirror import DecodeMirror
from app.engine.runtime.llm_engine import LLMEngine
from app.engine.runtime.types import SamplingParams

BLOCK_SIZE = 4
CACHE = torch.zeros(8, BLOCK_SIZE, 2, 16)  # a layer's pool: 2 KV heads of 16


def plan(mirror: DecodeMirror, seq_ids, seq_lens):
    slots = torch.zeros(len(seq_ids), dtype=torch.int64)
    return mirror.begin_step(tuple(seq_ids), list(seq_lens), slots, BLOCK_SIZE, CACHE)


def test_a_step_appends_only_when_it_continues_the_committed_one(monkeypatch):
    monkeypatch.setattr(decode_mirror, "HEADROOM_TOKENS", 4)
    mirror = DecodeMirror(num_layers=2, max_bytes=1 << 20)
    first = plan(mirror, [1, 2], [5, 9])
    assert first.refill and first.capacity == 16 and first.num_keys == 9  # 9 + 4, in blocks
    mirror.commit()
    assert not plan(mirror, [1, 2], [6, 10]).refill  # the same batch, one token longer
    # ... whose forward pass failed: no commit
    assert plan(mirror, [1, 2], [7, 11]).refill
    mirror.commit()
    assert plan(mirror, [2, 1], [12, 8]).refill  # another order
    mirror.commit()
    step = plan(mirror, [2, 1], [14, 9])  # a sequence grew by more than one token
    assert step.refill and step.capacity == 20
    mirror.commit()
    for longest in range(15, 21):  # appends until the longest fills the capacity
        step = plan(mirror, [2, 1], [longest, longest - 5])
        assert not step.refill and step.capacity == 20 and step.num_keys == longest
        mirror.commit()
    step = plan(mirror, [2, 1], [21, 16])
    assert step.refill and step.capacity == 28  # outgrown: a bigger one
    mirror.commit()
    mirror.reset()  # a step that did not go through the mirror came between
    assert plan(mirror, [2, 1], [22, 17]).refill


def test_a_batch_over_the_memory_budget_is_not_mirrored(monkeypatch):
    monkeypatch.setattr(decode_mirror, "HEADROOM_TOKENS", 4)
    # 2 layers x (K, V) x 2 rows x 2 heads x capacity 16 x 16 dims x 4 bytes = 16,384 bytes
    mirror = DecodeMirror(num_layers=2, max_bytes=16_383)
    assert plan(mirror, [1, 2], [5, 9]) is None
    mirror.max_bytes = 16_384
    assert plan(mirror, [1, 2], [5, 9]) is not None


def test_refills_reuse_their_storage_and_grow_it_by_doubling(monkeypatch):
    """A refill never allocates per layer: the rows live on storage kept across refills, grown
    to at least twice its size (within the budget) when a longer history needs more, and the
    blocks pass through one staging buffer."""
    monkeypatch.setattr(decode_mirror, "HEADROOM_TOKENS", 4)
    mirror = DecodeMirror(num_layers=2, max_bytes=1 << 20)
    cache = torch.randn(8, BLOCK_SIZE, 2, 16)
    tables = torch.tensor([[3, 4, 0, 1, 2, 3], [5, 6, 7, 2, 1, 0]])

    def refill(seq_lens):
        step = plan(mirror, [1, 2], seq_lens)
        assert step.refill
        blocks = tables[:, : -(-max(seq_lens) // BLOCK_SIZE)]
        for layer in range(2):
            keys, values = step.refill_layer(layer, cache, cache, blocks)
        mirror.commit()
        return keys

    keys = refill([6, 9])  # capacity 16: 2 rows x 2 heads x 16 x 16 per layer
    storage = [mirror._storage[layer].data_ptr() for layer in range(2)]
    staging = mirror._staging.data_ptr()
    gathered = cache[tables[:, :3]].flatten(1, 2).transpose(1, 2)  # [B, Hkv, M * bs, D]
    assert torch.equal(keys, gathered[:, :, :9])
    assert mirror._storage[0].shape == (2, 2 * 2 * 16 * 16)
    refill([5, 8])  # another batch shape, no larger: the same storage
    assert [mirror._storage[layer].data_ptr() for layer in range(2)] == storage
    assert mirror._staging.data_ptr() == staging
    refill([6, 13])  # capacity 20 outgrows it: twice the old size, not just enough
    assert mirror._storage[0].shape == (2, 2 * (2 * 2 * 16 * 16))
    # Within a budget of capacity 24 (2 layers x K, V x 4 bytes), doubling stops at it.
    mirror = DecodeMirror(num_layers=2, max_bytes=2 * 2 * 4 * (2 * 2 * 24 * 16))
    refill([6, 9])
    refill([6, 13])
    assert mirror._storage[0].shape == (2, 2 * 2 * 24 * 16)


def run(model, mirrored: bool, refills: list[bool]):
    """Four requests of different lengths whose chunked prefills interleave their blocks in the
    pool; they finish at different steps, so the decode batch changes several times."""
    log = LogitsLog()
    engine = LLMEngine(
        model,
        num_blocks=128,
        block_size=BLOCK_SIZE,
        max_batch_tokens=12,
        max_num_seqs=4,
        check_invariants=True,
        on_logits=log,
    )
    if not mirrored:
        engine.runner.attn.decode_mirror.max_bytes = 0
    prepare = engine.runner.prepare

    def recording_prepare(batch):
        prepared = prepare(batch)
        if engine.runner.attn.mirror_step is not None:
            refills.append(engine.runner.attn.mirror_step.refill)
        return prepared

    engine.runner.prepare = recording_prepare
    ids = []
    for i, (length, max_tokens) in enumerate([(23, 30), (9, 12), (30, 25), (14, 40)]):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        ids.append(
            engine.add_request(f"t{i}", [], random_ids(length, seed=i), params, first_turn=True)
        )
    finished = run_to_finish(engine)
    return [(finished[i].token_ids, log.rows[i]) for i in ids]


def test_decodes_through_the_mirror_equal_gathering_from_the_pool(monkeypatch):
    monkeypatch.setattr(decode_mirror, "HEADROOM_TOKENS", 6)  # outgrown every few steps
    model = random_model(seed=3)
    refills: list[bool] = []
    mirrored = run(model, mirrored=True, refills=refills)
    gathered_refills: list[bool] = []
    gathered = run(model, mirrored=False, refills=gathered_refills)
    assert gathered_refills == []  # the reference never used the mirror
    # Appends and refills (new batches, outgrown capacity) both happened, appends the most.
    assert refills.count(True) >= 4 and refills.count(False) > 2 * refills.count(True)
    for (got_ids, got_rows), (want_ids, want_rows) in zip(mirrored, gathered, strict=True):
        assert got_ids == want_ids
        for got, want in zip(got_rows, want_rows, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
