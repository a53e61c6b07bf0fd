"""KV pool sizes for a benchmark run, from the workloads and the model's KV bytes per token.

The `cache` instance gets a pool that holds every conversation of the non-pressure profiles at
once (so those profiles measure residency, not eviction). The `pressure` instances get a pool that
holds only a fraction of the live history at the end of the run, but always room for the turns
in flight, so the eviction is of idle threads and no turn is starved.

Standard library only; the bytes per token come from the caller (suite.model_kv_bytes_per_token).
"""

from __future__ import annotations

import math

from bench.multiturn.workloads import Conversation, Workload

# SimpleChatFormat (the built-in models): <|user|> text <|end|> <|assistant|>, the reply, <|end|>;
# a thread opens with <|bos|>. Other chat formats spend a few more; the margins below cover them.
USER_TURN_OVERHEAD = 3
REPLY_OVERHEAD = 1
THREAD_OVERHEAD = 1
MARGIN = 1.25


def conversation_tokens(conversation: Conversation) -> int:
    """An upper bound on the conversation's token log at its end (replies at max_tokens)."""
    return THREAD_OVERHEAD + sum(
        t.user_tokens + USER_TURN_OVERHEAD + t.max_tokens + REPLY_OVERHEAD
        for t in conversation.turns
    )


def live_tokens(workload: Workload) -> int:
    """Every conversation's final log, all resident at once."""
    return sum(conversation_tokens(c) for c in workload.conversations)


def in_flight_tokens(workload: Workload, concurrency: int) -> int:
    """The most KV that `concurrency` turns in flight can need at once."""
    longest = sorted((conversation_tokens(c) for c in workload.conversations), reverse=True)
    return sum(longest[:concurrency])


def resident_pool_tokens(workloads: list[Workload]) -> int:
    """A pool that keeps every thread of every given workload resident."""
    return math.ceil(max((live_tokens(w) for w in workloads), default=0) * MARGIN)


def pressure_pool_tokens(workload: Workload, concurrency: int, fraction: float) -> int:
    """A pool of `fraction` of the final live history, never less than the turns in flight."""
    if not 0 < fraction < 1:
        raise ValueError(f"the pressure pool fraction must be within (0, 1), got {fraction}")
    floor = math.ceil(in_flight_tokens(workload, concurrency) * MARGIN)
    pool = max(math.ceil(live_tokens(workload) * fraction), floor)
    if pool >= live_tokens(workload):
        raise ValueError(
            f"the pressure workload's live history ({live_tokens(workload):,} tokens) fits a pool "
            f"that holds its {concurrency} turns in flight ({floor:,} tokens): raise --scale or "
            "lower --concurrency so that eviction happens"
        )
    return pool


def pool_mb(tokens: int, bytes_per_token: int) -> int:
    """KVTHREADS_KV_CACHE_MB for a pool of at least `tokens` tokens."""
    return max(1, math.ceil(tokens * bytes_per_token / 2**20))
