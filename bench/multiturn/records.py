"""What one benchmark run measured: one record per turn, as plain data (JSON in, JSON out).

Standard library only, shared by the HTTP driver and the engine-level GPU script.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.multiturn.workloads import Conversation

MODES = ("cache", "recompute")


@dataclass
class TurnRecord:
    conversation: int
    turn: int  # 1-based turn index within the conversation
    user_tokens: int  # the user message's length as the workload asked for it
    max_tokens: int
    thread_id: str = ""
    started_s: float = 0.0  # when the request was sent, seconds since the run started
    ttft_s: float | None = None  # request sent -> first generated token seen by the client
    total_s: float | None = None  # request sent -> last event (usage) received
    token_times_s: list[float] = field(default_factory=list)  # request sent -> each token event
    input_tokens: int = 0
    cached_tokens: int = 0
    fresh_tokens: int = 0
    output_tokens: int = 0
    cost: str | None = None  # exact decimal as the service sent it
    cache_hit: bool | None = None
    miss_reason: str | None = None
    finish_reason: str | None = None
    server: dict = field(default_factory=dict)  # server-side timings when the service sends them
    # 409 thread_busy answers retried before the turn ran: the service may still be releasing the
    # previous turn's lock just after its `done` event (timing starts at the attempt that ran).
    busy_retries: int = 0
    error: str | None = None

    @classmethod
    def for_turn(
        cls, conversation: Conversation, turn: int, thread_id: str, error: str | None = None
    ) -> TurnRecord:
        """The record of turn `turn` (1-based) of `conversation`, before anything is measured."""
        spec = conversation.turns[turn - 1]
        return cls(
            conversation=conversation.index,
            turn=turn,
            user_tokens=spec.user_tokens,
            max_tokens=spec.max_tokens,
            thread_id=thread_id,
            error=error,
        )

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RunResult:
    """One profile played in one mode."""

    profile: str
    mode: str  # "cache" or "recompute"
    concurrency: int
    seed: int
    wall_s: float
    turns: list[TurnRecord]
    settings: dict = field(default_factory=dict)  # how the service was configured

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> RunResult:
        names = {f.name for f in fields(TurnRecord)}
        turns = [TurnRecord(**{k: v for k, v in t.items() if k in names}) for t in data["turns"]]
        return cls(
            profile=data["profile"],
            mode=data["mode"],
            concurrency=data["concurrency"],
            seed=data["seed"],
            wall_s=data["wall_s"],
            turns=turns,
            settings=data.get("settings", {}),
        )
