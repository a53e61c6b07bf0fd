"""GET /healthz: the process answers, its database does too, and its engine has not failed.

The app answers only once the lifespan has loaded the model and warmed up its kernels, so a 200
also means ready. After a device fault the engine has failed for good: 503, and the process
exits non-zero for its supervisor to restart it (app/threads/runtime_factory.py).
"""

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


class Health(msgspec.Struct, omit_defaults=True):
    status: str  # "ok" | "unavailable"
    database: str  # "ok" | "unreachable"
    engine: str | None = None  # "failed: <the device fault>"; absent while the engine is fine


@get(
    "/healthz",
    operation_id="healthz",
    tags=["health"],
    responses={503: ResponseSpec(Health, description="the database did not answer within 2 s")},
)
async def healthz(state: State) -> Response[Health]:
    """200 when the database answers a ping within 2 s and the engine has not failed, else 503."""
    runtime = getattr(state, "runtime", None)
    failure = getattr(getattr(runtime, "engine", None), "failure", None)
    if failure is not None:
        health = Health(status="unavailable", database="ok", engine=f"failed: {failure}")
        return Response(health, status_code=503)
    try:
        await asyncio.wait_for(ping(state.db), timeout=PING_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure to ping means "unreachable"
        logger.warning("health check: database ping failed: %s", exc)
        return Response(Health(status="unavailable", database="unreachable"), status_code=503)
    return Response(Health(status="ok", database="ok"))
