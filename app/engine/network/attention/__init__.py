"""Attention backends over the paged KV pool, one per device (base.py says how they are used)."""

from app.engine.network.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    create_backend,
)

__all__ = ["AttentionBackend", "AttentionMetadata", "create_backend"]
