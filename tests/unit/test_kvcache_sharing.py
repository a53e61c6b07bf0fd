"""Shared full blocks: prefix reuse across threads, scopes, fork, rewind, copy-on-write."""

from app.engine.runtime.types import MissReason
from app.kvcache import KVCacheManager
from app.kvcache.block_hash import chain_hash, root_hash


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def make(num_blocks=8, block_size=4):
    copies: list[tuple[int, int]] = []
    kv = KVCacheManager(
        num_blocks,
        block_size,
        identity=b"test-model",
        copy_block=lambda src, dst: copies.append((src, dst)),
        clock=FakeClock(),
    )
    return kv, copies


def run_turn(kv, key, prompt, computed, *, scope="acct", first_turn=True, keep=None):
    lookup = kv.begin_turn(key, prompt, first_turn=first_turn, scope=scope)
    assert kv.ensure_blocks(key, len(computed))
    kv.finish_turn(key, computed)
    kv.release(key, keep)
    kv.check_integrity()
    return lookup


def test_hashes_are_stable_and_depend_on_everything_before():
    root = root_hash(b"m", "acct")
    assert root == root_hash(b"m", "acct")
    assert root != root_hash(b"m", "other") != root_hash(b"n", "acct")
    # A fixed value: the hash may never depend on the process (no salted hash()).
    assert chain_hash(b"", [1, 2, 3]).hex() == chain_hash(b"", (1, 2, 3)).hex()
    assert chain_hash(root, [1, 2]) != chain_hash(root_hash(b"m", "x"), [1, 2])
    assert len(chain_hash(root, [1])) == 16


def test_a_second_thread_reuses_the_full_blocks_of_a_common_prefix():
    kv, copies = make()
    system = list(range(10))  # blocks [0 1 2 3] [4 5 6 7] [8 9 . .]
    run_turn(kv, "a", system + [50], system + [50, 60])  # a: blocks 0 1 2
    lookup = kv.begin_turn("b", system + [70, 71], first_turn=True, scope="acct")
    # a's full blocks, held twice now, and a private copy of a's block 2 for the ids 8 9.
    assert (lookup.num_cached_tokens, lookup.miss_reason) == (10, MissReason.NEW_THREAD)
    assert lookup.num_shared_tokens == 8  # the copied ids are cached, not shared
    assert lookup.block_table == [0, 1, 3]
    assert copies == [(2, 3)]
    assert [kv.pool.ref_count(b) for b in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert kv.ensure_blocks("b", 12)
    assert lookup.block_table == [0, 1, 3]
    kv.finish_turn("b", system + [70, 71])
    kv.release("b")
    kv.count_turn(lookup.miss_reason, lookup.num_cached_tokens, lookup.num_shared_tokens)
    kv.check_integrity()
    stats = kv.stats()
    assert (stats.logical_tokens, stats.unique_tokens, stats.num_shared_blocks) == (24, 16, 2)
    assert stats.shared_tokens == 8
    assert kv.thread_state("b").shared_tokens == 8
    assert copies == [(2, 3)]


def test_a_partial_block_is_copied_from_the_thread_with_the_longest_exact_match():
    kv, copies = make(num_blocks=12)
    system = list(range(6))  # blocks [0 1 2 3] [4 5 . .]
    run_turn(kv, "a", system, system)  # a: blocks 0 1, its last one partial (4 5)
    run_turn(kv, "b", system + [7, 8], system + [7, 8, 9])  # b: 0 and 2 [4 5 7 8], 3 [9]
    assert copies == [(1, 2)]  # b copied a's partial block, then wrote 7 8 after 4 5
    # c matches b's full block 2 for 3 ids (4 5 7), a's partial one for 2: b's is copied.
    lookup = kv.begin_turn("c", system + [7, 6, 1], first_turn=True, scope="acct")
    assert (lookup.num_cached_tokens, lookup.num_shared_tokens) == (7, 4)
    assert lookup.block_table == [0, 4] and copies[-1] == (2, 4)
    kv.release("c", keep_tokens=lookup.num_cached_tokens)
    kv.check_integrity()
    # Another scope finds nothing; a prompt that differs inside block 0 neither.
    lookup = kv.begin_turn("d", system + [7], first_turn=True, scope="other")
    assert lookup.num_cached_tokens == 0
    kv.release("d", keep_tokens=0)
    lookup = kv.begin_turn("e", [0, 1, 9, 3, 4], first_turn=True, scope="acct")
    assert lookup.num_cached_tokens == 2  # block 0's first two ids, copied from a
    kv.release("e", keep_tokens=0)
    kv.check_integrity()


def test_scopes_never_share():
    kv, _ = make()
    run_turn(kv, "a", list(range(10)), list(range(10)), scope="acct-a")
    lookup = kv.begin_turn("b", list(range(10)), first_turn=True, scope="acct-b")
    assert (lookup.num_cached_tokens, lookup.num_shared_tokens) == (0, 0)
    assert kv.ensure_blocks("b", 10)
    assert not set(lookup.block_table) & set(kv._threads["a"].block_table)


def test_no_scope_means_no_sharing():
    kv, _ = make()
    run_turn(kv, "a", list(range(10)), list(range(10)), scope=None)
    assert kv.begin_turn("b", list(range(10)), first_turn=True).num_cached_tokens == 0


def test_a_freed_named_block_stays_cached_until_reused():
    kv, _ = make(num_blocks=4)
    run_turn(kv, "a", list(range(9)), list(range(9)))  # blocks 0 1 2; 0 1 named
    kv.forget("a")
    assert kv.pool.free_block_ids() == [3, 0, 1, 2]
    assert kv.stats().num_cached_free_blocks == 2
    lookup = kv.begin_turn("b", list(range(12)), first_turn=True, scope="acct")
    assert (lookup.num_cached_tokens, lookup.block_table) == (8, [0, 1])
    assert kv.pool.free_block_ids() == [3, 2]
    kv.release("b")
    # Allocating evicts cached blocks from the free queue's head only when reused.
    kv.begin_turn("c", [9] * 16, first_turn=True, scope="acct")
    assert kv.ensure_blocks("c", 16)  # needs all 4: b is evicted, its blocks reused
    assert kv.pool.num_cache_evictions == 2
    kv.check_integrity()


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    kv, copies = make()
    log = list(range(10))
    run_turn(kv, "p", log, log)  # blocks 0 1 2, 10 tokens
    assert kv.fork("p", "c", log) == 10
    kv.check_integrity()
    assert kv._threads["c"].block_table == [0, 1, 3]
    assert copies == [(2, 3)]
    # At a block boundary nothing is copied.
    assert kv.fork("c", "cc", log[:8]) == 8
    assert kv._threads["cc"].block_table == [0, 1]
    assert copies == [(2, 3)]
    assert [kv.pool.ref_count(b) for b in (0, 1, 2, 3)] == [3, 3, 1, 1]
    # The child's next turn reuses everything it holds.
    lookup = kv.begin_turn("c", log + [11], first_turn=False, scope="acct")
    assert (lookup.num_cached_tokens, lookup.miss_reason, lookup.num_shared_tokens) == (
        10,
        None,
        8,
    )
    kv.release("c")
    kv.check_integrity()


def test_deleting_a_thread_keeps_the_blocks_others_hold():
    kv, _ = make()
    log = list(range(10))
    run_turn(kv, "p", log, log)
    kv.fork("p", "c", log)
    kv.forget("p")
    kv.check_integrity()
    assert kv._threads["c"].block_table == [0, 1, 3]
    assert [kv.pool.ref_count(b) for b in (0, 1, 2, 3)] == [1, 1, 0, 1]
    assert 2 in kv.pool.free_block_ids() and 0 not in kv.pool.free_block_ids()


def test_rewind_inside_a_shared_block_copies_it_first():
    kv, copies = make()
    log = list(range(10))
    run_turn(kv, "p", log, log)
    kv.fork("p", "c", log)  # c: [0 1 3]
    assert kv.truncate("c", log[:6]) == 6
    assert kv._threads["c"].block_table == [0, 4]  # block 1 is shared: its copy is 4
    assert copies[-1] == (1, 4)
    kv.check_integrity()
    # Alone in a named block: it is un-named instead of copied.
    kv.forget("c")
    assert kv.truncate("p", log[:5]) == 5
    assert kv._threads["p"].block_table == [0, 1]
    assert kv.pool.block_hash(1) is None
    assert len(copies) == 2  # nothing more copied
    kv.check_integrity()


def test_eviction_frees_only_blocks_nobody_else_holds():
    kv, _ = make(num_blocks=6)
    log = list(range(8))
    run_turn(kv, "a", log, log)  # blocks 0 1
    kv.begin_turn("b", log + [1, 2, 3, 4], first_turn=True, scope="acct")  # pinned on 0 1
    assert kv.ensure_blocks("b", 12)  # + block 2
    # 3 free; a is evictable but frees nothing: b (pinned) holds a's blocks.
    assert not kv.ensure_blocks("b", 28)
    assert kv.ensure_blocks("b", 24)
    assert kv.lru_order() == ["a"]
    kv.check_integrity()


def test_a_pinned_thread_can_fork_only_what_it_held_before_its_turn():
    kv, _ = make()
    log = list(range(6))
    run_turn(kv, "p", log, log)
    kv.begin_turn("p", log + [7, 8, 9], first_turn=False, scope="acct")
    assert kv.ensure_blocks("p", 9)
    assert kv.fork("p", "c", log + [7, 8, 9]) == 6
    kv.check_integrity()
