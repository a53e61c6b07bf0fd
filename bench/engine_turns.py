"""Timing one turn streamed from the engine in process (AsyncLLMEngine.generate), shared by the
engine-level benchmarks (ttft_cache.py, shared_prefix.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from app.engine.runtime.types import FinishEvent


async def drain_timed(
    stream: AsyncIterator, start: float
) -> tuple[float | None, FinishEvent | None]:
    """Read a turn's events to the end: (seconds from `start` to the first event, the turn's
    FinishEvent; None for either that never came)."""
    ttft = None
    finish: FinishEvent | None = None
    async for event in stream:
        if ttft is None:
            ttft = time.perf_counter() - start
        if isinstance(event, FinishEvent):
            finish = event
    return ttft, finish
