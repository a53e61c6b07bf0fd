"""usage_ledger.cache_tier: where a turn's cached tokens came from (device, host or disk).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 09:00:00.000000+00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("usage_ledger", sa.Column("cache_tier", sa.Text(), nullable=True))
    op.create_check_constraint(
        op.f("ck_usage_ledger_cache_tier_known"),
        "usage_ledger",
        "cache_tier IN ('device', 'host', 'disk')",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_usage_ledger_cache_tier_known"), "usage_ledger", type_="check")
    op.drop_column("usage_ledger", "cache_tier")
