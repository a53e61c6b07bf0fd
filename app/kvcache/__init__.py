"""KV cache bookkeeping in plain ints: the block pool, per-thread residency, LRU, counters."""

from app.kvcache.block_pool import BlockPool, BlockPoolExhausted
from app.kvcache.manager import CacheLookup, KVCacheManager, ThreadCache, ThreadInFlight
from app.kvcache.stats import KVCacheStats, ThreadCacheState

__all__ = [
    "BlockPool",
    "BlockPoolExhausted",
    "CacheLookup",
    "KVCacheManager",
    "KVCacheStats",
    "ThreadCache",
    "ThreadCacheState",
    "ThreadInFlight",
]
