"""Database rows -> response structs."""

from __future__ import annotations

from datetime import datetime
from typing import Any

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
        ),
    )
