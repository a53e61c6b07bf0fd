"""Finish a short critical step even when the calling task is cancelled.

A client that goes away cancels the task serving it (Litestar cancels the streaming task group,
and anyio repeats the cancellation until the task leaves the scope). The step that commits a turn
(or gives back a lock) must not stop halfway: it runs as its own task and the caller waits for
it; a cancellation that arrives meanwhile is delivered once the step is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def run_to_completion(step: Coroutine[Any, Any, T]) -> T:
    task = asyncio.ensure_future(step)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # the step's own failure says more than the cancellation
        raise asyncio.CancelledError
    return task.result()
