"""Build the model runtime (loaded model + AsyncEngine) from settings, for the app's lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from app.config import Settings
from app.threads.ports import ModelRuntime


@asynccontextmanager
async def open_model_runtime(
    settings: Settings, given: Any | None
) -> AsyncIterator[ModelRuntime | None]:
    """The runtime the app serves with: the one given (its owner starts and stops it)."""
    if isinstance(given, ModelRuntime):
        yield given
        return
    # TEMPORARY until app/engine/bridge.py lands: no engine, no threads API.
    yield None
