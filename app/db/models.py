"""The schema, as SQLAlchemy 2 models. Alembic's revisions in migrations/versions/ must match it
(tests/integration/test_migrations.py checks that autogenerate finds nothing to do).

Ids are prefixed strings made in Python (app/db/ids.py). Timestamps are timestamptz set by the
server. Money is numeric(20, 10): unit prices per million tokens and costs are exact decimals.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from functools import partial
from typing import Any

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.db import ids

# Deterministic constraint names, so that migrations can name what they drop.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

MONEY = Numeric(20, 10)
MESSAGE_ROLES = ("system", "user", "assistant")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(
        Text, primary_key=True, default=partial(ids.new_id, ids.ACCOUNT)
    )
    name: Mapped[str] = mapped_column(Text, nullable=False)
    created_at: Mapped[datetime] = _created_at()


class ApiKey(Base):
    """An API key. Only the SHA-256 of the secret is kept; `prefix` shows which key it is."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(
        Text, primary_key=True, default=partial(ids.new_id, ids.API_KEY)
    )
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False, index=True
    )
    name: Mapped[str] = mapped_column(Text, nullable=False)
    prefix: Mapped[str] = mapped_column(Text, nullable=False)
    key_hash: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    created_at: Mapped[datetime] = _created_at()
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class BillingSession(Base):
    """A sign-in of the billing page. The cookie holds a random token; only its SHA-256 is kept.
    It ends at `expires_at`, on sign-out (`revoked_at`), or when its key is revoked."""

    __tablename__ = "billing_sessions"

    id: Mapped[str] = mapped_column(
        Text, primary_key=True, default=partial(ids.new_id, ids.BILLING_SESSION)
    )
    token_hash: Mapped[str] = mapped_column(Text, nullable=False, unique=True)
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False
    )
    api_key_id: Mapped[str] = mapped_column(
        ForeignKey("api_keys.id", ondelete="CASCADE"), nullable=False, index=True
    )
    created_at: Mapped[datetime] = _created_at()
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Thread(Base):
    __tablename__ = "threads"
    __table_args__ = (
        # The account's threads, newest first, with the id as a stable tie-break for cursors.
        Index("ix_threads_account_created", "account_id", "created_at", "id"),
        CheckConstraint("token_count >= 0 AND message_count >= 0", name="counts_not_negative"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True, default=partial(ids.new_id, ids.THREAD))
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False
    )
    model: Mapped[str] = mapped_column(Text, nullable=False)
    system_prompt: Mapped[str | None] = mapped_column(Text)
    # "metadata" is reserved on declarative classes, hence the attribute name.
    metadata_: Mapped[dict[str, str]] = mapped_column(
        "metadata", JSONB, nullable=False, server_default="{}"
    )
    token_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    message_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now(), onupdate=func.now()
    )


class Message(Base):
    """One message of a thread with its exact token ids (chat-format tokens included)."""

    __tablename__ = "messages"
    __table_args__ = (
        # Also the index that reads a thread's messages in order.
        UniqueConstraint("thread_id", "position"),
        CheckConstraint("position >= 0", name="position_not_negative"),
        CheckConstraint(
            "role IN (" + ", ".join(f"'{r}'" for r in MESSAGE_ROLES) + ")", name="role_known"
        ),
    )

    id: Mapped[str] = mapped_column(
        Text, primary_key=True, default=partial(ids.new_id, ids.MESSAGE)
    )
    thread_id: Mapped[str] = mapped_column(
        ForeignKey("threads.id", ondelete="CASCADE"), nullable=False
    )
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    role: Mapped[str] = mapped_column(Text, nullable=False)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    token_ids: Mapped[list[int]] = mapped_column(ARRAY(Integer), nullable=False)
    created_at: Mapped[datetime] = _created_at()


class UsageRecord(Base):
    """One row per turn: what was computed, what was served from the cache, and what it cost.

    `thread_id` is set to NULL when the thread is deleted: the bill outlives the thread.
    `response` keeps the first response of a turn sent with an idempotency key, for replay.
    """

    __tablename__ = "usage_ledger"
    __table_args__ = (
        Index("ix_usage_ledger_account_created", "account_id", "created_at"),
        UniqueConstraint("account_id", "idempotency_key"),
        CheckConstraint("input_tokens = cached_tokens + fresh_tokens", name="input_split"),
        CheckConstraint(
            "cached_tokens >= 0 AND fresh_tokens >= 0 AND output_tokens >= 0",
            name="tokens_not_negative",
        ),
        CheckConstraint("shared_tokens BETWEEN 0 AND cached_tokens", name="shared_within_cached"),
        CheckConstraint("cost >= 0", name="cost_not_negative"),
        CheckConstraint("cache_tier IN ('device', 'host', 'disk')", name="cache_tier_known"),
    )

    id: Mapped[str] = mapped_column(Text, primary_key=True, default=partial(ids.new_id, ids.USAGE))
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="RESTRICT"), nullable=False
    )
    thread_id: Mapped[str | None] = mapped_column(
        ForeignKey("threads.id", ondelete="SET NULL"), index=True
    )
    model: Mapped[str] = mapped_column(Text, nullable=False)
    input_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    cached_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    fresh_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    output_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    miss_reason: Mapped[str | None] = mapped_column(Text)
    # Of cached_tokens, those served from KV blocks shared with other threads.
    shared_tokens: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    # Where cached_tokens came from: device, host or disk (the KV tiers); None: nothing cached.
    cache_tier: Mapped[str | None] = mapped_column(Text)
    price_fresh_input: Mapped[Decimal] = mapped_column(MONEY, nullable=False)  # per 1M tokens
    price_cached_input: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    price_output: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    cost: Mapped[Decimal] = mapped_column(MONEY, nullable=False)
    queue_ms: Mapped[float | None] = mapped_column(Double)
    ttft_ms: Mapped[float | None] = mapped_column(Double)
    total_ms: Mapped[float | None] = mapped_column(Double)
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _created_at()


class StoredResponse(Base):
    """A stored OpenAI-shaped response: a position in a thread (app/openai/).

    The response's reply is the message `message_id` of `thread_id`; chaining from it continues
    that thread when it still ends there, else forks it at `position`. Deleting the thread, or
    rewinding it past the reply, deletes the response with it (the foreign keys cascade).
    `body` is the response object as returned; `input_items` the items of its input.
    """

    __tablename__ = "responses"
    __table_args__ = (Index("ix_responses_account_created", "account_id", "created_at"),)

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    account_id: Mapped[str] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False
    )
    thread_id: Mapped[str] = mapped_column(
        ForeignKey("threads.id", ondelete="CASCADE"), nullable=False, index=True
    )
    message_id: Mapped[str] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), nullable=False, index=True
    )
    position: Mapped[int] = mapped_column(Integer, nullable=False)  # the reply's position
    token_count: Mapped[int] = mapped_column(Integer, nullable=False)  # the log through the reply
    body: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    input_items: Mapped[list[Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = _created_at()
