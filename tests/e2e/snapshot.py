"""Every row of every table, to prove a rejected request wrote nothing."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.db.models import ApiKey, Base

# Authentication stamps the key's last use (app/db/accounts.authenticate), also on a request
# that is then rejected: that is a record of the key being used, not something the request wrote.
IGNORED_COLUMNS = {(ApiKey.__tablename__, "last_used_at")}


async def snapshot(sessions: async_sessionmaker[AsyncSession]) -> dict[str, list[tuple]]:
    tables: dict[str, list[tuple]] = {}
    async with sessions() as session:
        for table in Base.metadata.sorted_tables:
            columns = [c for c in table.columns if (table.name, c.name) not in IGNORED_COLUMNS]
            rows = (await session.execute(select(*columns))).all()
            tables[table.name] = sorted(tuple(map(repr, row)) for row in rows)
    return tables
