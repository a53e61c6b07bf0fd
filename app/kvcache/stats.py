"""Read-only snapshots of the KV cache: the pool as a whole, and one thread."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVCacheStats:
    residency: bool  # False: every turn recomputes everything (the benchmark's recompute mode)
    block_size: int
    num_blocks: int
    num_used_blocks: int
    num_free_blocks: int  # includes the cached free blocks below
    num_resident_threads: int  # threads holding blocks, in flight or not
    num_pinned_threads: int  # threads with a turn in flight
    hits: int  # committed turns that reused all of their thread's resident KV
    misses: dict[str, int]  # turns that could not, by MissReason value (every reason present)
    evictions: int  # resident threads evicted whole to make room
    preemptions: int  # in-flight threads whose blocks were taken back under pressure
    cached_tokens: int  # prompt tokens served from resident KV, over all turns
    computed_tokens: int  # tokens run through the model (prefill, decode, recompute)
    # Shared blocks (full blocks named by their content hash, held by several threads).
    shared_tokens: int = 0  # of cached_tokens, those in blocks shared with other threads
    num_shared_blocks: int = 0  # used blocks with more than one holder
    num_cached_free_blocks: int = 0  # free blocks whose KV a matching prefix can still reuse
    logical_tokens: int = 0  # KV tokens the resident threads hold, each thread counted apart
    unique_tokens: int = 0  # the same, each block counted once: what the pool really stores
    block_copies: int = 0  # partial blocks copied on write (fork, rewind, a shared tail)

    @property
    def sharing_ratio(self) -> float:
        """Logical over unique KV tokens: 1.0 without sharing, N for N threads on one prefix."""
        return self.logical_tokens / self.unique_tokens if self.unique_tokens else 1.0


@dataclass(frozen=True)
class ThreadCacheState:
    resident: bool  # holds KV blocks now
    pinned: bool  # a turn is in flight (or finished, awaiting commit/rollback)
    cached_tokens: int  # tokens whose KV is held (as of the last finished turn)
    num_blocks: int
    last_used: float | None  # clock() of the last commit/rollback; None if never released
    shared_tokens: int = 0  # of cached_tokens, those in blocks other threads hold too
    tier: str | None = None  # where its KV lives: device, host, disk; None: nowhere
