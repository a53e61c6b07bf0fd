"""The reasons a cache lookup gives for a miss; the engine reports them in a turn's counts."""

from __future__ import annotations

from enum import StrEnum


class MissReason(StrEnum):
    """Why a turn found less of its history in the cache than it could have."""

    NEW_THREAD = "new_thread"  # the thread has no history yet
    EVICTED = "evicted"  # it was resident in this process, then evicted for room
    RESTARTED = "restarted"  # the process never held it (the server restarted since)
    MISMATCH = "mismatch"  # cached tokens were not a prefix of the log
    # The thread moved on elsewhere (another process sharing the database committed turns):
    # the KV this process holds is a strict prefix of the committed history, the rest recomputed.
    STALE = "stale"
    DISABLED = "disabled"  # residency is turned off (the recompute mode of the benchmark)
    # Its KV was on disk but the snapshot failed a check (other model or layout, tokens not a
    # prefix of the log, a bad checksum, a truncated file): deleted, the history recomputed.
    SNAPSHOT_INVALID = "snapshot_invalid"
