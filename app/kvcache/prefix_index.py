"""Find the resident full blocks that hold a token log's prefix, by their chain hashes.

    log:      [ blk 0 | blk 1 | blk 2 | blk 3 | 2 ids ]     block_size 4, 18 ids
    matched:  [  b7   |  b2   |  b9   ]  miss on blk 3: the walk stops (a hash names a prefix,
                                         so nothing after a miss can match)

The pool's hash index is the prefix index: a hash maps to the one block (used, or free but
still cached) holding that prefix's KV.
"""

from __future__ import annotations

from collections.abc import Sequence

from app.kvcache.block_hash import BlockHash, chain_hash
from app.kvcache.block_pool import BlockPool


def match_prefix(
    pool: BlockPool,
    root: BlockHash,
    token_ids: Sequence[int],
    *,
    known: Sequence[BlockHash],
    max_blocks: int,
) -> list[tuple[int, BlockHash]]:
    """(block id, hash) of the indexed blocks holding token_ids' full blocks len(known) ..
    max_blocks - 1, in order, up to the first miss. `known` are the hashes of the blocks before
    (the caller holds them already)."""
    bs = pool.block_size
    prev = known[-1] if known else root
    found: list[tuple[int, BlockHash]] = []
    for i in range(len(known), max_blocks):
        block_hash = chain_hash(prev, token_ids[i * bs : (i + 1) * bs])
        block_id = pool.lookup(block_hash)
        if block_id is None:
            break
        found.append((block_id, block_hash))
        prev = block_hash
    return found
