"""Read-only snapshots of the KV cache: the pool as a whole, and one thread."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVCacheStats:
    residency: bool  # False: every turn recomputes everything (the benchmark's recompute mode)
    block_size: int
    num_blocks: int
    num_used_blocks: int
    num_free_blocks: int
    num_resident_threads: int  # threads holding blocks, in flight or not
    num_pinned_threads: int  # threads with a turn in flight
    hits: int  # turns that reused all of their thread's resident KV
    misses: dict[str, int]  # turns that could not, by MissReason value (every reason present)
    evictions: int  # resident threads evicted whole to make room
    preemptions: int  # in-flight threads whose blocks were taken back under pressure
    cached_tokens: int  # prompt tokens served from resident KV, over all turns
    computed_tokens: int  # tokens run through the model (prefill, decode, recompute)


@dataclass(frozen=True)
class ThreadCacheState:
    resident: bool  # holds KV blocks now
    pinned: bool  # a turn is in flight (or finished, awaiting commit/rollback)
    cached_tokens: int  # tokens whose KV is held (as of the last finished turn)
    num_blocks: int
    last_used: float | None  # clock() of the last commit/rollback; None if never released
