"""The Litestar application: routes, error handlers, and the lifespans that open and close the
database and the model runtime (app/threads/lifespan.py).

    create_app(settings=None, runtime=None) -> Litestar

What handlers and services find on `app.state` while the app runs:

    settings   Settings         the configuration the app was made with
    db         AsyncEngine      SQLAlchemy's async engine (one connection pool per process)
    sessions   async_sessionmaker[AsyncSession]
    runtime    ModelRuntime     the model, its AsyncLLMEngine and chat format: the `runtime`
                                argument (tests inject theirs), else built from settings
    threads    ThreadsComponents  the thread and turn services the /v1 routes use

Run it with `python -m app serve`, or `uvicorn --factory app.asgi:create_app`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.template import TemplateConfig

from app.api.billing_page import BillingPageController
from app.api.errors import EXCEPTION_HANDLERS
from app.api.health import healthz
from app.api.limits import LIMIT_HANDLERS, api_rate_limit, sign_in_rate_limit
from app.api.metrics import metrics
from app.api.openai.router import create_openai_router
from app.api.openapi import describe_v1_api
from app.api.router import create_v1_router
from app.api.security_headers import set_security_headers
from app.billing import TEMPLATES_DIR as BILLING_TEMPLATES
from app.config import ConfigError, Settings, load_settings
from app.db.session import create_engine, create_session_factory, database_timeouts
from app.threads.lifespan import threads_lifespan

API_VERSION = "0.1.0"


def create_app(settings: Settings | None = None, runtime: Any | None = None) -> Litestar:
    settings = settings if settings is not None else load_settings()
    if settings.database_url is None:
        raise ConfigError("DATABASE_URL is not set (make run starts a local database for you)")

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        db = create_engine(settings.database_url, timeouts=database_timeouts(settings))
        app.state.db = db
        app.state.sessions = create_session_factory(db)
        try:
            yield
        finally:
            await db.dispose()

    return Litestar(
        route_handlers=[
            healthz,
            metrics,
            create_v1_router(settings.max_message_bytes, api_rate_limit(settings)),
            create_openai_router(settings.max_message_bytes, api_rate_limit(settings)),
            BillingPageController,
        ],
        # Entered in order, left in reverse: the engine stops before the database closes.
        lifespan=[lifespan, threads_lifespan(settings, runtime)],
        exception_handlers={**EXCEPTION_HANDLERS, **LIMIT_HANDLERS},
        middleware=sign_in_rate_limit(settings),
        before_send=[set_security_headers],
        on_startup=[describe_v1_api],
        state=State({"settings": settings, "runtime": None}),
        template_config=TemplateConfig(directory=BILLING_TEMPLATES, engine=JinjaTemplateEngine),
        openapi_config=OpenAPIConfig(title="kvthreads", version=API_VERSION, path="/schema"),
    )
