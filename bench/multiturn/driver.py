"""Plays a workload against a `TurnSender` with a fixed concurrency and collects the turn records.

The sender is what talks to the system under test: HTTP to the service (client.py) or the engine
in process (bench/gpu_multiturn.py). Standard library only.

Play order:
  - a normal profile gives each of `concurrency` workers one conversation at a time, played turn
    after turn (one user typing); at most `concurrency` turns are in flight.
  - an interleaved profile (`pressure`) plays turn 1 of every conversation, then turn 2 of every
    one, and so on, `concurrency` at a time: every thread stays live, so the KV pool overflows.
    Each round visits the conversations in a seeded random order (the same in both modes): a
    fixed cyclic order would make LRU evict every thread just before its next turn.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Protocol

from bench.multiturn.records import MODES, RunResult, TurnRecord
from bench.multiturn.workloads import Conversation, Workload


class TurnSender(Protocol):
    async def create_thread(self, conversation: Conversation) -> str:
        """A new, empty thread for `conversation`; returns its id."""
        ...

    async def send_turn(self, thread_id: str, conversation: Conversation, turn: int) -> TurnRecord:
        """Play `turn` (1-based) of `conversation` on the thread and measure it. Failures come back
        as a record with `error` set, not as exceptions."""
        ...


async def play(
    workload: Workload,
    sender: TurnSender,
    *,
    mode: str,
    concurrency: int,
    settings: dict | None = None,
) -> RunResult:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    start = time.perf_counter()
    records: list[TurnRecord] = []
    threads: dict[int, str] = {}

    async def play_turn(conversation: Conversation, turn: int) -> None:
        sent_at = time.perf_counter() - start
        try:
            if conversation.index not in threads:
                threads[conversation.index] = await sender.create_thread(conversation)
            record = await sender.send_turn(threads[conversation.index], conversation, turn)
        except Exception as exc:  # noqa: BLE001 - one failed turn must not end the run
            record = TurnRecord.for_turn(
                conversation,
                turn,
                threads.get(conversation.index, ""),
                error=f"{type(exc).__name__}: {exc}",
            )
        record.started_s = sent_at
        records.append(record)

    slots = asyncio.Semaphore(concurrency)

    async def play_conversation(conversation: Conversation) -> None:
        async with slots:
            for turn in range(1, len(conversation.turns) + 1):
                await play_turn(conversation, turn)

    async def play_one(conversation: Conversation, turn: int) -> None:
        async with slots:
            await play_turn(conversation, turn)

    conversations = workload.conversations
    if workload.profile.interleaved:
        for turn in range(1, max(len(c.turns) for c in conversations) + 1):
            players = [c for c in conversations if turn <= len(c.turns)]
            random.Random(f"order:{workload.seed}:{turn}").shuffle(players)
            await asyncio.gather(*(play_one(c, turn) for c in players))
    else:
        await asyncio.gather(*(play_conversation(c) for c in conversations))
    wall = time.perf_counter() - start
    records.sort(key=lambda r: (r.conversation, r.turn))
    return RunResult(
        profile=workload.profile.name,
        mode=mode,
        concurrency=concurrency,
        seed=workload.seed,
        wall_s=wall,
        turns=records,
        settings=dict(settings or {}),
    )
