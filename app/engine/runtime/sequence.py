"""One turn being generated: the single owner of its ids, KV progress, sampling state and counts.

token_ids:  [ history | new message | generated ... ]
             <------- prompt ------->
num_cached_tokens: how many leading ids have their KV in the pool. The last sampled id never
has KV yet, so a decoding sequence has exactly one uncomputed token; after a preemption it
has them all again.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Hashable
from collections.abc import Sequence as Seq
from enum import Enum

import torch

from app.chat.detokenizer import Decode, IncrementalDetokenizer
from app.engine.runtime.types import MissReason, SamplingParams, TurnCounts


class SequenceStatus(Enum):
    WAITING = "waiting"  # not admitted yet, or preempted
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        seq_id: int,
        thread_key: Hashable,
        prompt_ids: Seq[int],
        history_len: int,
        params: SamplingParams,
        *,
        block_table: list[int],
        num_cached_tokens: int,
        miss_reason: MissReason | None,
        decode: Decode | None,
        device: torch.device,
        arrival: float | None = None,
        num_shared_tokens: int = 0,
        cache_tier: str | None = None,
    ) -> None:
        self.seq_id = seq_id
        self.thread_key = thread_key
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.history_len = history_len  # the committed log's length: where a rollback goes
        self.params = params
        self.block_table = block_table  # owned by the KV cache manager; grows while running
        self.num_cached_tokens = num_cached_tokens
        self.num_prompt_cached = num_cached_tokens  # served from resident KV (for the counts)
        self.num_prompt_shared = num_shared_tokens  # of those, in blocks other threads hold
        self.miss_reason = miss_reason
        self.cache_tier = cache_tier  # where the cached tokens came from: device, host, disk
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        # Its own generator, so a seeded sequence samples the same tokens alone or batched.
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        # On the CPU whatever the model's device: a draw is then a host op, not a launch.
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(seed)
        self.detokenizer = (
            IncrementalDetokenizer(decode, prompt_ids, params.stop) if decode is not None else None
        )
        self.arrival = time.perf_counter() if arrival is None else arrival
        self.first_scheduled: float | None = None
        self.first_token: float | None = None
        self.finished: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def computed_ids(self) -> list[int]:
        """The ids whose KV the pool holds for this sequence."""
        return self.token_ids[: self.num_cached_tokens]

    def lose_cache(self) -> None:
        """Preempted: its KV is gone, everything is recomputed; a hit becomes an eviction."""
        self.num_cached_tokens = 0
        if self.num_prompt_cached > 0:
            self.num_prompt_cached = 0
            self.num_prompt_shared = 0
            self.miss_reason = MissReason.EVICTED
            self.cache_tier = None
        self.status = SequenceStatus.WAITING

    def counts(self) -> TurnCounts:
        return TurnCounts(
            prompt_tokens=self.num_prompt_tokens,
            cached_tokens=self.num_prompt_cached,
            computed_tokens=self.num_prompt_tokens - self.num_prompt_cached,
            generated_tokens=self.num_generated,
            miss_reason=self.miss_reason,
            shared_tokens=self.num_prompt_shared,
            cache_tier=self.cache_tier,
        )

    def timings(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.first_scheduled is not None:
            out["queue_s"] = self.first_scheduled - self.arrival
        if self.first_token is not None:
            out["ttft_s"] = self.first_token - self.arrival
        if self.finished is not None:
            out["total_s"] = self.finished - self.arrival
        return out
