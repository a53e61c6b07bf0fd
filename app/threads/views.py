"""Database rows -> response structs.

    thread_view(thread_row)                                  -> schemas.Thread
    message_view(message_row)                                -> schemas.Message
    turn_result_view(reply_row, "stop", usage_ledger_row)    -> schemas.TurnResult

A turn's usage is read from its ledger row, so what the client is told is what it is billed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from app.billing.export import money
from app.db import models
from app.threads import schemas


def unix_seconds(moment: datetime) -> int:
    return int(moment.timestamp())


def thread_view(row: models.Thread) -> schemas.Thread:
    return schemas.Thread(
        id=row.id,
        created_at=unix_seconds(row.created_at),
        model=row.model,
        system=row.system_prompt,
        metadata=dict(row.metadata_),
        token_count=row.token_count,
        message_count=row.message_count,
    )


def message_view(row: models.Message) -> schemas.Message:
    return schemas.Message(
        id=row.id,
        thread_id=row.thread_id,
        position=row.position,
        role=row.role,  # type: ignore[arg-type]  # the schema's CHECK keeps it to the three roles
        content=row.content,
        token_count=len(row.token_ids),
        created_at=unix_seconds(row.created_at),
    )


def usage_view(row: models.UsageRecord) -> schemas.Usage:
    return schemas.Usage(
        input_tokens=row.input_tokens,
        cached_tokens=row.cached_tokens,
        fresh_tokens=row.fresh_tokens,
        output_tokens=row.output_tokens,
        cost=money(row.cost),
    )


def turn_result_view(
    reply: models.Message, finish_reason: str, usage: models.UsageRecord
) -> schemas.TurnResult:
    """A committed turn: its assistant message (flushed: it has its created_at) and ledger row."""
    message = msgspec.structs.asdict(message_view(reply))
    return schemas.TurnResult(
        thread_id=reply.thread_id,
        message=schemas.AssistantMessage(**message, finish_reason=finish_reason),
        usage=usage_view(usage),
        cache=schemas.TurnCache(
            hit=usage.miss_reason is None,
            tier=usage.cache_tier,
            miss_reason=usage.miss_reason,
            shared_tokens=usage.shared_tokens,
        ),
    )


def thread_detail(row: models.Thread, state: Any) -> schemas.ThreadDetail:
    """The thread with its cache state (the engine's thread_state: .resident, .cached_tokens,
    and .shared_tokens when the engine shares blocks)."""
    view = thread_view(row)
    return schemas.ThreadDetail(
        **{f: getattr(view, f) for f in view.__struct_fields__},
        cache=schemas.CacheState(
            resident=bool(state.resident),
            cached_tokens=int(state.cached_tokens),
            shared_tokens=int(getattr(state, "shared_tokens", 0)),
            tier=getattr(state, "tier", None) or ("device" if state.resident else None),
        ),
    )
