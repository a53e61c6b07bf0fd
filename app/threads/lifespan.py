"""The threads part of the app's lifespan: the model runtime and the services on app.state.

Registered after the database's lifespan, so it starts after the database opens and stops before
it closes: shutting the engine down aborts in-flight turns (they roll back and commit nothing)
while the database is still there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar

from app.config import Settings
from app.threads.components import build_components
from app.threads.runtime_factory import open_model_runtime


def threads_lifespan(settings: Settings, given: Any | None):
    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with open_model_runtime(settings, given) as runtime:
            app.state.runtime = runtime
            app.state.threads = build_components(
                settings, app.state.db, app.state.sessions, runtime
            )
            yield

    return lifespan
