"""usage_ledger.shared_tokens: cached tokens served from KV blocks shared with other threads.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 09:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "usage_ledger",
        sa.Column("shared_tokens", sa.Integer(), server_default="0", nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_usage_ledger_shared_within_cached"),
        "usage_ledger",
        "shared_tokens BETWEEN 0 AND cached_tokens",
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("ck_usage_ledger_shared_within_cached"), "usage_ledger", type_="check"
    )
    op.drop_column("usage_ledger", "shared_tokens")
