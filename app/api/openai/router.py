"""The OpenAI-shaped /v1 routes: same keys, rate limit and strict JSON bodies as the native
router (app/api/router.py), OpenAI's error shape."""

from __future__ import annotations

from collections.abc import Sequence

from litestar import Router
from litestar.di import Provide
from litestar.types import Middleware

from app.api.auth import provide_account_id
from app.api.json_body import JSONRequest
from app.api.openai.controllers import (
    ChatController,
    ConversationController,
    ModelController,
    ResponseController,
)
from app.api.openai.deps import provide_openai
from app.api.openai.errors import OPENAI_EXCEPTION_HANDLERS
from app.api.router import BODY_OVERHEAD_BYTES, JSON_ESCAPE_FACTOR

# A Chat Completions call carries its whole history: room for many messages at the size limit.
HISTORY_FACTOR = 16


def create_openai_router(max_message_bytes: int, middleware: Sequence[Middleware] = ()) -> Router:
    return Router(
        path="/v1",
        request_max_body_size=max_message_bytes * JSON_ESCAPE_FACTOR * HISTORY_FACTOR
        + BODY_OVERHEAD_BYTES,
        route_handlers=[
            ModelController,
            ResponseController,
            ConversationController,
            ChatController,
        ],
        dependencies={
            "account_id": Provide(provide_account_id),
            "openai": Provide(provide_openai, sync_to_thread=False),
        },
        exception_handlers=OPENAI_EXCEPTION_HANDLERS,
        middleware=list(middleware),
        request_class=JSONRequest,
    )
