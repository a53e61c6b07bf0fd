"""The threads services of one app instance, built once by the lifespan, kept on app.state.threads."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.billing.prices import PriceSource
from app.config import Settings
from app.threads.ports import ModelRuntime
from app.threads.quotas import AccountQuotas
from app.threads.service import ThreadService
from app.threads.turn import TurnLimits, TurnService
from app.threads.turn_lock import TurnLocks


@dataclass(frozen=True)
class ThreadsComponents:
    runtime: ModelRuntime
    locks: TurnLocks
    threads: ThreadService
    turns: TurnService


def build_components(
    settings: Settings,
    db: AsyncEngine,
    sessions: async_sessionmaker[AsyncSession],
    runtime: ModelRuntime,
) -> ThreadsComponents:
    locks = TurnLocks(db)
    prices = PriceSource(settings.prices)  # read again per turn: edits apply without a restart
    return ThreadsComponents(
        runtime=runtime,
        locks=locks,
        threads=ThreadService(sessions, runtime, locks),
        turns=TurnService(
            sessions,
            runtime,
            locks,
            prices.current,
            TurnLimits(
                max_message_bytes=settings.max_message_bytes,
                quotas=AccountQuotas(
                    max_turns_in_flight=settings.max_turns_in_flight,
                    monthly_token_budget=settings.monthly_token_budget,
                    monthly_spend_budget=settings.monthly_spend_budget,
                ),
            ),
        ),
    )
