"""Make /schema describe the /v1 API as it behaves; Litestar's generated document does not.

    Litestar(..., on_startup=[describe_v1_api])   # completes app.openapi_schema once, at start

Litestar documents a success and its own 400 shape. Every /v1 operation here also gets:
the bearer key as its security; each error it can answer, in our shape {error: {type, message}}
(400, 401, 503 everywhere; 404 where an id is in the path; 413 and 415 with a body; the
statuses an operation lists in `EXTRA_STATUSES`); `additionalProperties: false` on request bodies
whose structs forbid unknown fields; `text/event-stream` where an operation can stream.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Litestar
from litestar.openapi.spec import (
    Components,
    OpenAPI,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Reference,
    Schema,
    SecurityScheme,
)

V1_PREFIX = "/v1/"
BEARER = "bearerKey"
ERROR_SCHEMA = "Error"

STATUS_DESCRIPTIONS = {
    400: "invalid request: a bad body, parameter or header; the message names it",
    401: "no key, a malformed Authorization header, an unknown or revoked key",
    404: "no such thread (conversation, response, item), or another account's; or a model "
    "this server does not serve",
    409: "a turn of this thread is in flight (or, for an item, it is not the newest)",
    413: "the message or the body is over the size limit",
    415: "the body is not sent as application/json",
    422: "the Idempotency-Key was used with a different request",
    429: "over a limit: requests per key per minute, turns in flight per account, or the monthly "
    "budget; the error's type says which, Retry-After when to retry",
    500: "generation failed in the engine; nothing was saved",
    503: "the database is not answering (Retry-After says when to retry); nothing was saved",
}

# Statuses that depend on what an operation does, by operationId.
EXTRA_STATUSES = {
    "appendMessage": {409, 422, 500},
    "deleteThread": {409},
    "rewindThread": {409},
    # The OpenAI-shaped routes (app/api/openai/); their errors carry param and code too.
    "createResponse": {404, 409, 422, 500},
    "createChatCompletion": {404, 409, 422, 500},
    "getModel": {404},
    "createConversation": {409},
    "deleteConversation": {409},
    "createConversationItems": {409},
    "deleteConversationItem": {409},
}
# `stream: true` answers text/event-stream: the events each operation sends.
STREAMING_OPERATIONS = {
    "appendMessage": (
        ["delta", "done", "error"],
        "one server-sent event: `delta` ({text}) events, then `done` (the JSON body of the "
        "non-streamed answer) or `error` ({error: {type, message}})",
    ),
    "createResponse": (
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
            "response.incomplete",
            "error",
            "response.failed",
        ],
        "OpenAI's response events, in that order; data carries `type` and `sequence_number`",
    ),
    "createChatCompletion": (
        None,
        "`data: {chat.completion.chunk}` events, then `data: [DONE]`",
    ),
}


def _error_schema() -> Schema:
    string = Schema(type=OpenAPIType.STRING)
    detail = Schema(
        type=OpenAPIType.OBJECT,
        properties={"type": string, "message": string},
        required=["type", "message"],
    )
    return Schema(
        type=OpenAPIType.OBJECT,
        properties={"error": detail},
        required=["error"],
        description="every error: {error: {type, message}}",
    )


def _error_response(status: int) -> OpenAPIResponse:
    headers = None
    if status in (429, 503):
        seconds = Schema(type=OpenAPIType.INTEGER)
        headers = {"Retry-After": OpenAPIHeader(schema=seconds, description="seconds")}
    elif status == 401:
        challenge = Schema(type=OpenAPIType.STRING)
        headers = {"WWW-Authenticate": OpenAPIHeader(schema=challenge)}
    ref = Reference(ref=f"#/components/schemas/{ERROR_SCHEMA}")
    return OpenAPIResponse(
        description=STATUS_DESCRIPTIONS[status],
        content={"application/json": OpenAPIMediaType(schema=ref)},
        headers=headers,
    )


def _operations(openapi: OpenAPI) -> list[tuple[str, Operation]]:
    found = []
    for path, item in (openapi.paths or {}).items():
        if not path.startswith(V1_PREFIX):
            continue
        for method in ("get", "put", "post", "delete", "patch"):
            operation = getattr(item, method, None)
            if operation is not None:
                found.append((path, operation))
    return found


def _body_schema_name(operation: Operation) -> str | None:
    body = operation.request_body
    if body is None or isinstance(body, Reference):
        return None
    media = (body.content or {}).get("application/json")
    if media is None or not isinstance(media.schema, Reference):
        return None
    return media.schema.ref.rsplit("/", 1)[-1]


def _statuses(path: str, operation: Operation) -> set[int]:
    statuses = {400, 401, 429, 503} | EXTRA_STATUSES.get(operation.operation_id or "", set())
    if "_id}" in path:
        statuses.add(404)
    if operation.request_body is not None:
        statuses |= {413, 415}
    return statuses


def document_v1(openapi: OpenAPI, request_structs: list[type[msgspec.Struct]]) -> None:
    """Complete `openapi` in place (see the module docstring)."""
    components = openapi.components or Components()
    openapi.components = components
    components.schemas = {**(components.schemas or {}), ERROR_SCHEMA: _error_schema()}
    components.security_schemes = {
        **(components.security_schemes or {}),
        BEARER: SecurityScheme(
            type="http",
            scheme="bearer",
            description="an API key: `python -m app keys create --name NAME`",
        ),
    }
    strict = {
        struct.__name__
        for struct in request_structs
        if struct.__struct_config__.forbid_unknown_fields
    }
    for name in strict & set(components.schemas):
        schema = components.schemas[name]
        if isinstance(schema, Schema):
            schema.additional_properties = False
    for path, operation in _operations(openapi):
        operation.security = [{BEARER: []}]
        responses: dict[str, Any] = dict(operation.responses or {})
        for status in sorted(_statuses(path, operation)):
            responses[str(status)] = _error_response(status)
        if operation.operation_id in STREAMING_OPERATIONS:
            names, description = STREAMING_OPERATIONS[operation.operation_id]
            ok = responses.get("200")
            if isinstance(ok, OpenAPIResponse) and ok.content is not None:
                properties = {
                    "data": Schema(type=OpenAPIType.STRING, content_media_type="application/json")
                }
                if names is not None:
                    properties["event"] = Schema(type=OpenAPIType.STRING, enum=names)
                events = Schema(
                    type=OpenAPIType.OBJECT,
                    properties=properties,
                    required=sorted(properties),
                    description=description,
                )
                ok.content["text/event-stream"] = OpenAPIMediaType(schema=events)
        operation.responses = responses


def describe_v1_api(app: Litestar) -> None:
    """`document_v1` on the app's document, with the request structs of its handlers."""
    structs = []
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            data = handler.parsed_data_field
            annotation = None if data is None else data.annotation
            if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
                structs.append(annotation)
    document_v1(app.openapi_schema, structs)
