"""Tier bookkeeping in plain ints: blocks by content key stored once, holder counts, LRU, budget."""

from __future__ import annotations

import pytest

from app.kvcache.block_hash import chain_hash, root_hash
from app.kvcache.tiers import Tier, TierEntry, TierStore, content_keys

ROOT = root_hash(b"model", "account:a")


def entry(key: str, token_ids: list[int]) -> TierEntry:
    return TierEntry(key, token_ids, content_keys(ROOT, token_ids, 4), root=ROOT)


def test_content_keys_are_the_chain_hashes_then_one_for_the_partial_block():
    keys = content_keys(ROOT, list(range(10)), 4)
    first = chain_hash(ROOT, [0, 1, 2, 3])
    second = chain_hash(first, [4, 5, 6, 7])
    assert keys == [first, second, chain_hash(second, [8, 9])]
    assert content_keys(ROOT, list(range(8)), 4) == [first, second]
    assert content_keys(ROOT, list(range(10)), 4, full=[first]) == keys


def test_shared_blocks_are_stored_and_copied_once_and_released_with_their_last_holder():
    tier = TierStore(Tier.HOST, capacity_blocks=8)
    a = entry("a", list(range(10)))  # blocks k0 k1 + a partial one
    b = entry("b", [*range(8), 42])  # k0 k1 shared, its own partial block
    assert [i for i, _ in tier.add(a)] == [0, 1, 2]
    assert tier.num_new_blocks(b.block_keys) == 1
    assert [i for i, _ in tier.add(b)] == [2]  # only its private block is copied
    assert (tier.num_blocks, tier.num_threads, tier.num_free) == (4, 2, 4)
    tier.check_integrity()
    assert tier.remove("a") == [a.block_keys[2]]  # the shared ones stay for b
    assert tier.remove("b") == b.block_keys
    assert (tier.num_blocks, tier.num_free) == (0, 8)
    tier.check_integrity()


def test_slots_are_reused_and_the_lru_skips_pinned_entries():
    tier = TierStore(Tier.HOST, capacity_blocks=4)
    first = tier.add(entry("a", [1, 2, 3, 4, 5]))
    tier.add(entry("b", [9, 9]))
    assert tier.lru_victim().key == "a"
    tier.get("a").pinned = True
    assert tier.lru_victim().key == "b"
    tier.touch("a")
    assert tier.lru_keys() == ["b", "a"]
    tier.get("a").pinned = False
    tier.remove("a")
    again = tier.add(entry("c", [7, 7, 7, 7, 7]))
    assert sorted(s for _, s in again) == sorted(s for _, s in first)
    tier.check_integrity()


def test_the_budget_is_never_exceeded():
    tier = TierStore(Tier.DISK, capacity_blocks=2)
    big = entry("big", list(range(9)))  # 3 blocks
    assert not tier.can_ever_hold(big.block_keys)
    with pytest.raises(RuntimeError):
        tier.add(big)
    tier.check_integrity()
    assert tier.num_blocks == 0
