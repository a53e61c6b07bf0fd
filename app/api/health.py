"""GET /healthz: the process answers and its database does too."""

from __future__ import annotations

import asyncio
import logging

import msgspec
from litestar import Response, get
from litestar.datastructures import State
from litestar.openapi import ResponseSpec

from app.db.session import ping

logger = logging.getLogger("app.api")
PING_TIMEOUT_S = 2.0


class Health(msgspec.Struct):
    status: str  # "ok" | "unavailable"
    database: str  # "ok" | "unreachable"


@get(
    "/healthz",
    operation_id="healthz",
    tags=["health"],
    responses={503: ResponseSpec(Health, description="the database did not answer within 2 s")},
)
async def healthz(state: State) -> Response[Health]:
    """200 when the database answers a ping within 2 s, else 503."""
    try:
        await asyncio.wait_for(ping(state.db), timeout=PING_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure to ping means "unreachable"
        logger.warning("health check: database ping failed: %s", exc)
        return Response(Health(status="unavailable", database="unreachable"), status_code=503)
    return Response(Health(status="ok", database="ok"))
