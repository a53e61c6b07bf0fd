"""What the service and the engine exchange: plain data, no torch.

The threads service calls the engine through `AsyncLLMEngine` (runtime/async_engine.py):

    stream = engine.generate(thread_key, history_ids, new_ids, params, first_turn=...)
    async for event in stream:          # TokenEvent ... then one FinishEvent
        ...
    # then, exactly once per finished turn, after the database transaction:
    engine.commit_turn(thread_key)      # the KV of the turn stays resident
    engine.rollback_turn(thread_key)    # the KV goes back to len(history_ids) tokens

`history_ids` is the thread's committed token log (what the database holds), `new_ids` the tokens
of the new user message (with its chat-format tokens and the assistant header). The engine reuses
whatever leading part of `history_ids + new_ids` it still holds for `thread_key` and computes the
rest. `first_turn` tells a new thread (miss reason new_thread) from one whose KV this process
never held although it has turns (restarted). A stream that is closed early (the client went away) cancels the sequence and rolls the
thread back by itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Decided by the KV cache manager; part of what a finished turn reports, so re-exported here.
from app.kvcache.miss_reason import MissReason


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    seed: int | None = None  # same seed, same prompt -> same tokens, alone or batched
    stop: tuple[str, ...] = ()  # stop strings, matched on the decoded text
    ignore_eos: bool = False  # benchmarks: generate exactly max_tokens


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str  # the text this token completes (may be "" while a UTF-8 sequence is partial)


@dataclass(frozen=True)
class TurnCounts:
    prompt_tokens: int  # len(history_ids + new_ids): what the model conditioned on
    cached_tokens: int  # served from the KV cache
    computed_tokens: int  # prompt tokens computed this turn (prompt_tokens - cached_tokens)
    generated_tokens: int
    miss_reason: MissReason | None  # None when the thread's resident KV was reused (a hit)
    shared_tokens: int = 0  # of cached_tokens, those in KV blocks shared with other threads
    cache_tier: str | None = None  # where cached_tokens came from: device, host, disk (None: 0)


@dataclass(frozen=True)
class FinishEvent:
    token_ids: list[int]  # every generated token, exactly as sampled (stop string tokens kept)
    text: str  # decoded text, cut before a matched stop string
    finish_reason: str  # "stop" (end-of-turn token or stop string) or "length"
    counts: TurnCounts
    timings: dict[str, float] = field(default_factory=dict)  # queue_s, ttft_s, total_s


StreamEvent = TokenEvent | FinishEvent
