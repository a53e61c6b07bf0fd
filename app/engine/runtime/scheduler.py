"""Continuous batching within a token budget, with chunked prefill and preemption.

Each step takes, in this order and while `max_batch_tokens` lasts:

1. running sequences with one token to compute (decodes), then running sequences part way
   through their prefill (the next chunk);
2. waiting sequences, oldest first, with their first chunk (up to `max_num_seqs` running).

Blocks come from the KV cache manager, which evicts least recently used idle threads. When a
running sequence still cannot grow, another sequence's blocks are taken back (preempted): first
the newest waiting one holding resident KV, then the newest running one not yet scheduled this
step; the victim recomputes later. With no victim left the sequence sits the step out: the
sequences scheduled now will finish and free blocks. Under pressure nothing new is admitted.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from app.engine.runtime.sequence import Sequence, SequenceStatus
from app.kvcache import KVCacheManager


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)  # per sequence, this step

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    def __init__(self, kv: KVCacheManager, *, max_batch_tokens: int, max_num_seqs: int) -> None:
        if max_batch_tokens < 1 or max_num_seqs < 1:
            raise ValueError("max_batch_tokens and max_num_seqs must be >= 1")
        self.kv = kv
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is last

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        scheduled: set[int] = set()
        budget = self.max_batch_tokens
        under_pressure = False

        decodes = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefills = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decodes + prefills:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.kv.ensure_blocks(seq.thread_key, seq.num_cached_tokens + num_new):
                under_pressure = True
                victim = self._pick_victim(exclude=seq, scheduled=scheduled)
                if victim is None:
                    break
                self._preempt(victim)
            else:
                self._add_to_batch(batch, scheduled, seq, num_new)
                budget -= num_new

        while (
            self.waiting
            and budget > 0
            and not under_pressure
            and len(self.running) < self.max_num_seqs
        ):
            seq = self.waiting[0]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.kv.ensure_blocks(seq.thread_key, seq.num_cached_tokens + num_new):
                if self.running:
                    break  # running sequences will finish and free blocks
                # Nothing runs: only other waiting turns' resident KV (or turns awaiting
                # commit) can hold the pool. Take the former back, newest first.
                victim = self._newest_waiting_with_blocks(exclude=seq)
                if victim is None:
                    break
                self._preempt(victim)
                continue
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add_to_batch(batch, scheduled, seq, num_new)
            budget -= num_new
        return batch

    def _add_to_batch(
        self, batch: ScheduledBatch, scheduled: set[int], seq: Sequence, num_new: int
    ) -> None:
        batch.seqs.append(seq)
        batch.num_new_tokens.append(num_new)
        scheduled.add(seq.seq_id)

    def _pick_victim(self, exclude: Sequence, scheduled: set[int]) -> Sequence | None:
        victim = self._newest_waiting_with_blocks(exclude=exclude)
        if victim is not None:
            return victim
        for seq in reversed(self.running):
            if seq is not exclude and seq.seq_id not in scheduled:
                return seq
        return None

    def _newest_waiting_with_blocks(self, exclude: Sequence) -> Sequence | None:
        for seq in reversed(self.waiting):
            if seq is not exclude and seq.block_table:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks (its thread's resident KV is lost); it recomputes later."""
        self.kv.drop_blocks(seq.thread_key)
        was_running = seq.status is SequenceStatus.RUNNING
        seq.lose_cache()
        if was_running:
            self.running.remove(seq)
            self.waiting.appendleft(seq)  # first in line when room comes back
