"""Attention backends over the paged KV pool, one per device (base.py says how they are used)."""

from app.engine.network.attention.base import (
    AttentionBackend,
    AttentionMetadata,
    StepOwners,
    create_backend,
)

__all__ = ["AttentionBackend", "AttentionMetadata", "StepOwners", "create_backend"]
