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
