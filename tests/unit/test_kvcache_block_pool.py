import pytest

from app.kvcache import BlockPool, BlockPoolExhausted


def test_allocates_from_the_head_and_frees_to_the_tail():
    pool = BlockPool(num_blocks=6, block_size=4)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.free_block_ids() == [5]
    pool.free([1, 0])
    assert pool.free_block_ids() == [5, 1, 0]
    assert pool.allocate(2) == [5, 1]
    assert (pool.num_free, pool.num_used) == (1, 5)
    assert [pool.ref_count(b) for b in range(6)] == [0, 1, 1, 1, 1, 1]
    pool.check_integrity()


def test_blocks_for_rounds_up():
    pool = BlockPool(num_blocks=4, block_size=4)
    assert [pool.blocks_for(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_refuses_over_allocation_and_double_free():
    pool = BlockPool(num_blocks=3, block_size=2)
    pool.allocate(2)
    with pytest.raises(BlockPoolExhausted):
        pool.allocate(2)
    assert pool.free_block_ids() == [2]  # a failed allocation takes nothing
    pool.free([0])
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free([0])
    pool.check_integrity()


def test_check_integrity_catches_a_block_both_free_and_held():
    pool = BlockPool(num_blocks=3, block_size=2)
    pool.allocate(1)
    pool._free[0] = None  # corrupt on purpose
    with pytest.raises(AssertionError):
        pool.check_integrity()


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0)])
def test_rejects_empty_pools(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockPool(num_blocks, block_size)


def test_a_table_grows_into_the_next_block_when_it_is_free_and_uncached():
    pool = BlockPool(num_blocks=8, block_size=4)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(2) == [2, 3]
    pool.free([3])  # the free queue: 4 5 6 7 3
    assert pool.allocate(2, after=1) == [4, 5]  # 2 is held: the head, then on from there
    assert pool.allocate(1, after=2) == [3]  # free again: right after 2, out of queue order
    assert pool.free_block_ids() == [6, 7]
    pool.check_integrity()


def test_a_cached_next_block_is_left_for_its_prefix():
    pool = BlockPool(num_blocks=6, block_size=4)
    pool.allocate(3)
    assert pool.register(1, b"prefix")
    pool.free([1])  # cached: the free queue is 3 4 5 1
    assert pool.allocate(1, after=0) == [3]  # not 1: its KV stays findable
    assert pool.lookup(b"prefix") == 1 and pool.num_cache_evictions == 0
    pool.check_integrity()


def test_a_new_run_starts_outside_the_claims():
    pool = BlockPool(num_blocks=12, block_size=4)
    assert pool.allocate(2) == [0, 1]
    # Blocks 2..5 are kept for the table ending at 1: a new table starts at 6.
    assert pool.allocate(2, claims=[(2, 6)]) == [6, 7]
    # A growing table ignores claims on its own next block, and jumps past them after.
    assert pool.allocate(1, after=1, claims=[(8, 10)]) == [2]
    assert pool.allocate(2, after=7, claims=[(3, 6)]) == [8, 9]
    # Every free block claimed: the head of the queue after all.
    assert pool.free_block_ids() == [3, 4, 5, 10, 11]
    assert pool.allocate(1, claims=[(3, 6), (10, 12)]) == [3]
    pool.check_integrity()
