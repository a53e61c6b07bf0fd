"""Server-side timings of each turn, read from the usage ledger.

The HTTP answer carries usage but no timings; the ledger row of every turn keeps the engine's own
`queue_ms`, `ttft_ms` (request queued -> first token sampled, whether or not that token made
visible text) and `total_ms`. When the benchmark can reach the database (it started it, or was
given --database-url), it folds them into the turn records as `server`.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from app.db.models import UsageRecord
from bench.multiturn.records import RunResult


async def attach_server_timings(database_url: str, run: RunResult) -> int:
    """Set `server` = {queue_s, ttft_s, total_s} on each turn of the run from its ledger row
    (matched by thread and input tokens, which grow every turn). Returns how many matched."""
    thread_ids = sorted({r.thread_id for r in run.turns if r.thread_id})
    if not thread_ids:
        return 0
    query = select(
        UsageRecord.thread_id,
        UsageRecord.input_tokens,
        UsageRecord.queue_ms,
        UsageRecord.ttft_ms,
        UsageRecord.total_ms,
    ).where(UsageRecord.thread_id.in_(thread_ids))
    engine = create_async_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(query)).all()
    finally:
        await engine.dispose()
    by_turn = {(row.thread_id, row.input_tokens): row for row in rows}
    matched = 0
    for record in run.turns:
        row = by_turn.get((record.thread_id, record.input_tokens))
        if row is None or not record.ok:
            continue
        timings = {"queue_s": row.queue_ms, "ttft_s": row.ttft_ms, "total_s": row.total_ms}
        record.server = {k: v / 1000 for k, v in timings.items() if v is not None}
        matched += 1
    return matched
