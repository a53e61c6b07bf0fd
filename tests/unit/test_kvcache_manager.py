import random
from collections import OrderedDict

import pytest

from app.engine.runtime.types import MissReason
from app.kvcache import KVCacheManager, ThreadInFlight
from app.kvcache.manager import common_prefix_len


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def make(num_blocks=8, block_size=4, residency=True):
    return KVCacheManager(num_blocks, block_size, residency=residency, clock=FakeClock())


def run_turn(kv, key, prompt, computed, *, first_turn=False, keep=None):
    """begin -> ensure -> finish -> release, as the engine does for one turn."""
    lookup = kv.begin_turn(key, prompt, first_turn=first_turn)
    assert kv.ensure_blocks(key, len(computed))
    kv.finish_turn(key, computed)
    kv.release(key, keep)
    kv.count_turn(lookup.miss_reason, lookup.num_cached_tokens, lookup.num_shared_tokens)
    kv.check_integrity()
    return lookup


def test_new_thread_then_hit_reuses_exact_blocks():
    kv = make()
    prompt = list(range(10))
    lookup = kv.begin_turn("a", prompt, first_turn=True)
    assert (lookup.num_cached_tokens, lookup.miss_reason, lookup.block_table) == (
        0,
        MissReason.NEW_THREAD,
        [],
    )
    assert kv.ensure_blocks("a", 10)
    assert lookup.block_table == [0, 1, 2]  # the live table, grown in place
    computed = prompt + [100]  # prompt + generated[:-1]
    kv.finish_turn("a", computed)
    kv.release("a")
    kv.check_integrity()
    assert kv.lru_order() == ["a"]
    state = kv.thread_state("a")
    assert (state.resident, state.pinned, state.cached_tokens, state.num_blocks) == (
        True,
        False,
        11,
        3,
    )

    turn2 = computed + [101, 7, 8, 9]  # history (with the last sampled token) + new message
    lookup = kv.begin_turn("a", turn2, first_turn=False)
    assert (lookup.num_cached_tokens, lookup.miss_reason) == (11, None)
    assert lookup.block_table == [0, 1, 2]
    assert kv.lru_order() == []  # pinned: out of the LRU
    assert kv.ensure_blocks("a", 15)
    assert lookup.block_table == [0, 1, 2, 3]
    kv.check_integrity()


def test_whole_prompt_cached_still_leaves_the_last_token_to_compute():
    kv = make()
    run_turn(kv, "a", list(range(8)), list(range(8)), first_turn=True)
    lookup = kv.begin_turn("a", list(range(8)), first_turn=False)
    assert (lookup.num_cached_tokens, lookup.miss_reason) == (7, None)
    assert lookup.block_table == [0, 1]


def test_mismatch_keeps_the_matching_prefix_and_frees_the_rest():
    kv = make()
    run_turn(kv, "a", list(range(10)), list(range(11)), first_turn=True)  # blocks 0 1 2
    prompt = [0, 1, 2, 3, 4, 5, 99, 7, 8, 9, 10, 11]
    lookup = kv.begin_turn("a", prompt, first_turn=False)
    assert (lookup.num_cached_tokens, lookup.miss_reason) == (6, MissReason.MISMATCH)
    assert lookup.block_table == [0, 1]
    assert kv.pool.free_block_ids() == [3, 4, 5, 6, 7, 2]
    kv.check_integrity()
    # A prompt shorter than the resident ids is a mismatch too (they are not its prefix).
    kv.release("a", None)
    lookup = kv.begin_turn("a", [0, 1, 2], first_turn=False)
    assert (lookup.num_cached_tokens, lookup.miss_reason) == (2, MissReason.MISMATCH)


def test_miss_reasons_new_restarted_evicted():
    kv = make(num_blocks=4, block_size=4)
    assert run_turn(kv, "a", [1] * 8, [1] * 8, first_turn=True).miss_reason == (
        MissReason.NEW_THREAD
    )
    # Never held by this process, but has turns: the server restarted.
    assert run_turn(kv, "b", [2] * 8, [2] * 8).miss_reason == MissReason.RESTARTED
    # c needs all 4 blocks: a and b are evicted, least recently used first.
    assert kv.lru_order() == ["a", "b"]
    run_turn(kv, "c", [3] * 16, [3] * 16, first_turn=True)
    assert kv.lru_order() == ["c"]
    assert kv.stats().evictions == 2
    assert run_turn(kv, "a", [1] * 9, [1] * 9).miss_reason == MissReason.EVICTED


def test_lru_evicts_least_recently_released_first_with_exact_blocks():
    kv = make(num_blocks=8, block_size=4)
    run_turn(kv, "a", [1] * 5, [1] * 5, first_turn=True)  # blocks 0 1
    run_turn(kv, "b", [2] * 5, [2] * 5, first_turn=True)  # blocks 2 3
    run_turn(kv, "c", [3] * 5, [3] * 5, first_turn=True)  # blocks 4 5
    assert kv.lru_order() == ["a", "b", "c"]
    # a is used again: it becomes the most recent.
    run_turn(kv, "a", [1] * 6, [1] * 6)
    assert kv.lru_order() == ["b", "c", "a"]
    assert kv.pool.free_block_ids() == [6, 7]
    # d needs 4 blocks: 2 free + b's 2 (b is least recent); c and a stay.
    kv.begin_turn("d", [4] * 16, first_turn=True)
    assert kv.ensure_blocks("d", 16)
    assert kv.thread_state("d").num_blocks == 4
    assert kv.lru_order() == ["c", "a"]
    assert not kv.thread_state("b").resident
    assert kv.pool.free_block_ids() == []
    assert [kv.holders(b) for b in range(8)] == [[k] for k in "aaddccdd"]
    kv.check_integrity()


def test_pinned_threads_are_never_evicted_and_failed_growth_evicts_nothing():
    kv = make(num_blocks=6, block_size=4)
    run_turn(kv, "a", [1] * 8, [1] * 8, first_turn=True)  # blocks 0 1, unpinned
    kv.begin_turn("b", [2] * 8, first_turn=True)
    assert kv.ensure_blocks("b", 8)  # blocks 2 3, pinned
    kv.begin_turn("c", [3] * 16, first_turn=True)
    # c needs 4: 2 free + a's 2 would do, but b is pinned, so asking for 5 must fail whole.
    assert not kv.ensure_blocks("c", 20)
    assert kv.lru_order() == ["a"]
    assert kv.stats().evictions == 0
    assert kv.ensure_blocks("c", 16)  # now a goes, b stays
    assert kv.lru_order() == []
    assert kv.thread_state("b").num_blocks == 2
    kv.check_integrity()


def test_second_turn_while_pinned_is_thread_busy():
    kv = make()
    kv.begin_turn("a", [1, 2, 3], first_turn=True)
    with pytest.raises(ThreadInFlight):
        kv.begin_turn("a", [1, 2, 3, 4], first_turn=False)
    with pytest.raises(ThreadInFlight):
        kv.forget("a")


def test_rollback_truncates_to_the_committed_length():
    kv = make(num_blocks=8, block_size=4)
    run_turn(kv, "a", list(range(6)), list(range(6)), first_turn=True)  # blocks 0 1
    history = list(range(6))
    prompt = history + [50, 51, 52]
    lookup = kv.begin_turn("a", prompt, first_turn=False)
    assert lookup.num_cached_tokens == 6
    assert kv.ensure_blocks("a", 13)
    assert lookup.block_table == [0, 1, 2, 3]
    kv.finish_turn("a", prompt + [60, 61, 62, 63])  # 13 tokens
    kv.release("a", keep_tokens=len(history))
    kv.check_integrity()
    assert kv.thread_state("a").cached_tokens == 6
    assert kv.thread_state("a").num_blocks == 2
    assert kv.pool.free_block_ids() == [4, 5, 6, 7, 2, 3]
    assert kv.begin_turn("a", history + [70], first_turn=False).num_cached_tokens == 6


def test_release_without_finish_keeps_only_the_prefix_found_at_begin():
    kv = make(num_blocks=8, block_size=4)
    run_turn(kv, "a", list(range(5)), list(range(5)), first_turn=True)
    kv.begin_turn("a", list(range(12)), first_turn=False)
    assert kv.ensure_blocks("a", 12)
    kv.release("a", keep_tokens=9)  # an abort before any KV was recorded: 5 tokens are known
    kv.check_integrity()
    assert kv.thread_state("a").cached_tokens == 5
    assert kv.thread_state("a").num_blocks == 2


def test_rollback_to_nothing_drops_the_thread():
    kv = make()
    kv.begin_turn("a", [1, 2, 3], first_turn=True)
    assert kv.ensure_blocks("a", 3)
    kv.finish_turn("a", [1, 2, 3])
    kv.release("a", keep_tokens=0)
    kv.check_integrity()
    assert kv.thread_state("a").resident is False
    assert kv.stats().num_used_blocks == 0


def test_drop_blocks_preempts_in_place():
    kv = make()
    lookup = kv.begin_turn("a", list(range(9)), first_turn=True)
    assert kv.ensure_blocks("a", 9)
    table = lookup.block_table
    kv.drop_blocks("a")
    assert table == [] and lookup.block_table is table
    assert kv.stats().preemptions == 1
    assert kv.is_pinned("a")
    kv.check_integrity()
    assert kv.ensure_blocks("a", 9)
    assert table == [3, 4, 5]  # freed blocks went to the tail of the free list


def test_forget_frees_and_forgets():
    kv = make()
    run_turn(kv, "a", [1] * 6, [1] * 6, first_turn=True)
    kv.forget("a")
    kv.check_integrity()
    assert kv.stats().num_used_blocks == 0
    assert kv.lru_order() == []
    assert run_turn(kv, "a", [1] * 6, [1] * 6).miss_reason == MissReason.RESTARTED
    kv.forget("never-seen")  # nothing to do


def test_residency_off_recomputes_and_frees_at_the_end_of_each_turn():
    kv = make(residency=False)
    lookup = run_turn(kv, "a", list(range(6)), list(range(6)), first_turn=True)
    assert (lookup.num_cached_tokens, lookup.miss_reason) == (0, MissReason.DISABLED)
    assert kv.stats().num_used_blocks == 0
    assert kv.thread_state("a").resident is False
    lookup = run_turn(kv, "a", list(range(8)), list(range(8)))
    assert (lookup.num_cached_tokens, lookup.miss_reason) == (0, MissReason.DISABLED)
    assert kv.stats().misses["disabled"] == 2


def test_stats_count_hits_misses_and_tokens():
    kv = make(num_blocks=8, block_size=4)
    run_turn(kv, "a", list(range(6)), list(range(7)), first_turn=True)
    run_turn(kv, "a", list(range(10)), list(range(11)))
    kv.note_computed(6)
    stats = kv.stats()
    assert stats.hits == 1
    assert stats.misses == {
        "new_thread": 1,
        "evicted": 0,
        "restarted": 0,
        "mismatch": 0,
        "stale": 0,
        "disabled": 0,
        "snapshot_invalid": 0,
    }
    assert (stats.cached_tokens, stats.computed_tokens) == (7, 6)
    assert (stats.num_used_blocks, stats.num_free_blocks, stats.num_resident_threads) == (3, 5, 1)


def test_bad_calls_are_refused():
    kv = make()
    with pytest.raises(ValueError):
        kv.begin_turn("a", [], first_turn=True)
    with pytest.raises(KeyError):
        kv.ensure_blocks("nobody", 3)
    kv.begin_turn("a", [1, 2], first_turn=True)
    with pytest.raises(ValueError, match="computed tokens"):
        kv.finish_turn("a", [1, 2])  # no blocks were reserved for them
    with pytest.raises(ValueError):
        kv.release("a", keep_tokens=-1)


def test_random_operations_match_a_reference_lru():
    """Random turns on a tiny pool, checked after every operation against a plain model:
    resident ids per thread and an LRU of unpinned threads."""
    rng = random.Random(7)
    block_size, num_blocks = 4, 12
    kv = make(num_blocks=num_blocks, block_size=block_size)
    resident: dict[str, list[int]] = {}  # the reference: ids held by unpinned threads
    lru: OrderedDict[str, None] = OrderedDict()
    keys = [f"t{i}" for i in range(6)]

    def blocks(n):
        return -(-n // block_size)

    for _ in range(400):
        key = rng.choice(keys)
        held = resident.get(key, [])
        # Usually extend the held ids; sometimes diverge or shrink.
        cut = len(held) if rng.random() < 0.7 else rng.randint(0, len(held))
        prompt = held[:cut] + [rng.randrange(50) for _ in range(rng.randint(1, 10))]
        lookup = kv.begin_turn(key, prompt, first_turn=not held)
        lru.pop(key, None)
        resident.pop(key, None)
        expect_cached = 0
        if held:
            match = 0
            while match < min(len(held), len(prompt)) and held[match] == prompt[match]:
                match += 1
            expect_cached = min(match, len(prompt) - 1)
        assert lookup.num_cached_tokens == expect_cached
        kv.check_integrity()
        generated = [rng.randrange(50) for _ in range(rng.randint(1, 6))]
        computed = prompt + generated[:-1]
        if blocks(len(computed)) > num_blocks:
            kv.release(key, keep_tokens=0)
            kv.check_integrity()
            continue
        # The reference evicts least recently used threads until the growth fits.
        in_use = sum(blocks(len(ids)) for ids in resident.values())
        need = blocks(len(computed)) - blocks(expect_cached)
        while num_blocks - in_use - blocks(expect_cached) < need:
            victim, _ = lru.popitem(last=False)
            in_use -= blocks(len(resident.pop(victim)))
        assert kv.ensure_blocks(key, len(computed))
        kv.check_integrity()
        assert kv.lru_order() == list(lru)
        kv.finish_turn(key, computed)
        keep = None if rng.random() < 0.8 else len(prompt)
        kv.release(key, keep)
        kv.check_integrity()
        ids = computed if keep is None else computed[:keep]
        if ids:
            resident[key] = ids
            lru[key] = None
        assert kv.lru_order() == list(lru)
        for k in keys:
            assert kv.thread_state(k).cached_tokens == len(resident.get(k, []))


def test_resident_kv_behind_the_committed_history_is_stale_not_a_hit():
    kv = make(num_blocks=8, block_size=4)
    kv.begin_turn("a", [1, 2, 3], first_turn=True, num_history_tokens=0)
    assert kv.ensure_blocks("a", 5)
    kv.finish_turn("a", [1, 2, 3, 4, 5])  # generated 4, 5, 6: the log is 1..6 and a closing 7
    kv.release("a", num_log_tokens=7)
    # The next turn here: the whole committed history is reused.
    lookup = kv.begin_turn("a", [1, 2, 3, 4, 5, 6, 7, 8], first_turn=False, num_history_tokens=7)
    assert (lookup.num_cached_tokens, lookup.miss_reason) == (5, None)
    kv.release("a", keep_tokens=5)
    # Another process committed turns since (the log is 12 long): the KV held is behind it.
    log = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    lookup = kv.begin_turn("a", [*log, 13], first_turn=False, num_history_tokens=12)
    assert (lookup.num_cached_tokens, lookup.miss_reason) == (5, MissReason.STALE)
    kv.release("a")
    kv.check_integrity()


def test_common_prefix_len_matches_a_token_by_token_scan():
    """The fast path (whole prefixes equal) and the scan after it agree with a plain loop."""
    rng = random.Random(0)
    for _ in range(500):
        a = [rng.randrange(3) for _ in range(rng.randrange(12))]
        b = a[: rng.randrange(len(a) + 1)] + [rng.randrange(3) for _ in range(rng.randrange(5))]
        expected = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
        )
        assert common_prefix_len(a, b) == expected
        assert common_prefix_len(tuple(b), a) == expected


def test_threads_in_a_turn_grow_in_consecutive_blocks():
    """Two turns decoding at once keep their tables consecutive: each keeps the room after its
    last block (an equal share of the free blocks), and a table that starts later starts past
    every claim."""
    kv = make(num_blocks=40, block_size=4)
    a = kv.begin_turn("a", [1] * 8, first_turn=True).block_table
    assert kv.ensure_blocks("a", 8) and a == [0, 1]
    b = kv.begin_turn("b", [2] * 8, first_turn=True).block_table
    assert kv.ensure_blocks("b", 8) and b == [21, 22]  # a keeps 2..20 (38 free // 2 threads)
    for n in (12, 16, 20):  # a token at a time, turn about
        assert kv.ensure_blocks("a", n) and kv.ensure_blocks("b", n)
    assert (a, b) == ([0, 1, 2, 3, 4], [21, 22, 23, 24, 25])
    c = kv.begin_turn("c", [3] * 4, first_turn=True).block_table
    assert kv.ensure_blocks("c", 4) and c == [15]  # a keeps 5..14, b 26..35 (30 // 3 each)
    kv.check_integrity()
    # A thread out of its turn keeps no room: d may start right after a.
    kv.finish_turn("a", [1] * 20)
    kv.release("a")
    d = kv.begin_turn("d", [4] * 4, first_turn=True).block_table
    assert kv.ensure_blocks("d", 4) and d == [5]
    kv.check_integrity()


def test_a_turn_after_its_thread_grew_alone_continues_its_table():
    kv = make(num_blocks=16, block_size=4)
    run_turn(kv, "a", [1] * 6, [1] * 7, first_turn=True)  # blocks 0 1
    run_turn(kv, "b", [2] * 6, [2] * 7, first_turn=True)  # blocks 2 3
    run_turn(kv, "a", [1] * 7 + [5] * 4, [1] * 7 + [5] * 6)  # 13 tokens: block 2 is b's
    assert kv._threads["a"].block_table == [0, 1, 4, 5]
    kv.forget("b")  # 2 and 3 free again (the queue: 6 .. 15 2 3)
    run_turn(kv, "c", [3] * 2, [3] * 2, first_turn=True)  # from the head: 6
    assert kv._threads["c"].block_table == [6]
    run_turn(kv, "c", [3] * 2 + [7] * 4, [3] * 2 + [7] * 6)  # 8 tokens: 7 follows 6
    assert kv._threads["c"].block_table == [6, 7]
