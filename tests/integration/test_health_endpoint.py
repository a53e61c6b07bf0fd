"""GET /healthz, GET /schema, and the JSON error shape."""

from __future__ import annotations

import dataclasses

from litestar.testing import AsyncTestClient

from app.asgi import create_app
from app.config import Settings
from tests.ports import free_port


async def test_healthz_is_ok_with_the_database_up(client: AsyncTestClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "ok"}


async def test_healthz_is_503_when_the_database_is_unreachable(settings: Settings) -> None:
    nowhere = f"postgresql+asyncpg://kvthreads:x@127.0.0.1:{free_port()}/kvthreads"
    app = create_app(dataclasses.replace(settings, database_url=nowhere))
    async with AsyncTestClient(app=app) as client:
        response = await client.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "database": "unreachable"}


async def test_openapi_schema_lists_healthz(client: AsyncTestClient) -> None:
    response = await client.get("/schema/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["info"]["title"] == "kvthreads"
    assert schema["paths"]["/healthz"]["get"]["operationId"] == "healthz"
    assert (await client.get("/schema")).status_code == 200


async def test_unknown_route_is_a_json_404(client: AsyncTestClient) -> None:
    response = await client.get("/no/such/route")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found"
    assert response.json()["error"]["message"]


async def test_wrong_method_is_a_json_405(client: AsyncTestClient) -> None:
    response = await client.post("/healthz")
    assert response.status_code == 405
    assert response.json()["error"]["type"] == "method_not_allowed"
