"""The threads API's bodies: msgspec structs the service takes and returns, validated on the way in.

Requests forbid unknown fields, so a typo (`max_token`) is a 400 naming the field rather than a
silently ignored option. Limits that depend on the running model (max_tokens against the context,
the message size in bytes) are checked by the turn service.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

MAX_METADATA_PAIRS = 16
MAX_STOP_STRINGS = 4

MetadataKey = Annotated[str, Meta(min_length=1, max_length=64)]
MetadataValue = Annotated[str, Meta(max_length=512)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=MAX_METADATA_PAIRS)]
StopString = Annotated[str, Meta(min_length=1, max_length=64)]
# A message's place in its thread; stored as a PostgreSQL integer, so larger is no position.
Position = Annotated[int, Meta(ge=0, le=2**31 - 1)]


class Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class CreateThreadRequest(Request, forbid_unknown_fields=True, kw_only=True):
    system: Annotated[str, Meta(max_length=65536)] | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)


class AppendMessageRequest(Request, forbid_unknown_fields=True, kw_only=True):
    content: Annotated[str, Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Meta(ge=0)] = 0
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    stop: Annotated[list[StopString], Meta(max_length=MAX_STOP_STRINGS)] = msgspec.field(
        default_factory=list
    )
    stream: bool = False


class ForkThreadRequest(Request, forbid_unknown_fields=True, kw_only=True):
    at: Position | None = None  # last message position kept; None: all
    metadata: Metadata | None = None  # None: the parent's


class RewindThreadRequest(Request, forbid_unknown_fields=True, kw_only=True):
    position: Position  # the last message kept


class Response(msgspec.Struct, kw_only=True):
    pass


class CacheState(Response, kw_only=True):
    """Where the thread's KV cache stands in this server process."""

    resident: bool  # on the device now
    cached_tokens: int  # tokens whose KV is kept, in whichever tier
    shared_tokens: int = 0  # of cached_tokens, those in KV blocks other threads hold too
    tier: Literal["device", "host", "disk"] | None = None  # where it is kept; null: nowhere


class Thread(Response, kw_only=True):
    id: str
    object: Literal["thread"] = "thread"
    created_at: int  # unix seconds
    model: str
    system: str | None
    metadata: dict[str, str]
    token_count: int
    message_count: int


class ThreadDetail(Thread, kw_only=True):
    cache: CacheState


class ThreadList(Response, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Thread]
    has_more: bool
    next_cursor: str | None  # pass as ?after= for the next page


class Message(Response, kw_only=True):
    id: str
    object: Literal["thread.message"] = "thread.message"
    thread_id: str
    position: int  # 0 is the thread's system message; turns follow in order
    role: Literal["system", "user", "assistant"]
    content: str
    token_count: int
    created_at: int


class MessageList(Response, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Message]
    has_more: bool
    next_cursor: str | None


class TokenLog(Response, kw_only=True):
    thread_id: str
    token_ids: list[int]


class Usage(Response, kw_only=True):
    input_tokens: int  # what the model conditioned on: the log before the reply
    cached_tokens: int  # of those, served from the KV cache
    fresh_tokens: int  # of those, computed this turn
    output_tokens: int  # generated
    cost: str  # exact decimal, in the price book's currency


class TurnCache(Response, kw_only=True):
    hit: bool
    tier: Literal["device", "host", "disk"] | None = None  # where the cached tokens came from
    miss_reason: str | None
    shared_tokens: int = 0  # of usage.cached_tokens, those from blocks shared with other threads


class AssistantMessage(Message, kw_only=True):
    finish_reason: str  # "stop" or "length"


class TurnResult(Response, kw_only=True):
    thread_id: str
    message: AssistantMessage
    usage: Usage
    cache: TurnCache


class Deleted(Response, kw_only=True):
    id: str
    object: Literal["thread.deleted"] = "thread.deleted"
    deleted: bool = True
