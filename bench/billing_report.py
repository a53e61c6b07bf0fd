"""How fast the billing report answers over a large ledger.

    python -m bench.billing_report [--rows 100000] [--other-rows 100000] [--repeat 7]

Fills a fresh, migrated database with `--rows` ledger rows for one account over 90 days (and
`--other-rows` for nine other accounts, so the report must pick its account out of a bigger table),
then times the report over the whole 90 days for each grouping: the SQL (build_report) alone, and
with the JSON and CSV the API would send. Uses DATABASE_URL's server when set, else a throwaway
local cluster (devtools/postgres/throwaway.py). Prints a table and writes
bench/out/billing_report.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from sqlalchemy import pool, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from app.billing.export import report_csv, sums_values
from app.billing.report import DayRange, GroupBy, build_report
from app.config import load_settings
from app.db import migrate
from app.db.session import create_session_factory
from devtools.postgres.throwaway import throwaway_cluster

OUT = Path(__file__).resolve().parent / "out" / "billing_report.json"
ACCOUNT = "acct_bench_0"
DAYS = DayRange.parse("2026-01-01", "2026-03-31")  # 90 days
THREADS_PER_ACCOUNT = 200

# Rows spread evenly over the 90 days; two price sets alternate, as if prices changed often.
# The {numbers} are the bench's own ints and floats, formatted in.
FILL = """
INSERT INTO accounts (id, name) SELECT 'acct_bench_' || a, 'bench ' || a FROM generate_series(0, 9) a;
INSERT INTO threads (id, account_id, model)
  SELECT 'thr_bench_' || t, 'acct_bench_' || (t % 10),
         CASE WHEN t % 3 = 0 THEN 'llama-3-8b' ELSE 'builtin-tiny-random' END
  FROM generate_series(0, {threads} - 1) t;
INSERT INTO usage_ledger (id, account_id, thread_id, model, input_tokens, cached_tokens,
                          fresh_tokens, output_tokens, price_fresh_input, price_cached_input,
                          price_output, cost, created_at)
  SELECT 'usg_bench_' || g, 'acct_bench_' || acct, 'thr_bench_' || thr,
         CASE WHEN thr % 3 = 0 THEN 'llama-3-8b' ELSE 'builtin-tiny-random' END,
         cached + fresh, cached, fresh, output, pf, pc, po,
         (cached * pc + fresh * pf + output * po) * 0.000001,
         timestamptz '2026-01-01 00:00:00+00' + make_interval(secs => (g % {per_account}) * {spacing})
  FROM (
    SELECT g, acct, (g % {threads_per_account}) * 10 + acct AS thr,
           (g * 7919) % 4000 AS cached, 1 + (g * 104729) % 600 AS fresh, (g * 31) % 300 AS output,
           CASE WHEN g % 2 = 0 THEN 0.50 ELSE 0.45 END AS pf,
           CASE WHEN g % 2 = 0 THEN 0 ELSE 0.05 END AS pc,
           CASE WHEN g % 2 = 0 THEN 1.50 ELSE 1.40 END AS po
    FROM (SELECT g, CASE WHEN g < {rows} THEN 0 ELSE 1 + g % 9 END AS acct
          FROM generate_series(0::bigint, {rows} + {other_rows} - 1) g) numbered
  ) turns;
ANALYZE usage_ledger;
"""


async def _fill(engine: AsyncEngine, rows: int, other_rows: int) -> None:
    spacing = DAYS.num_days * 86400 / max(rows, other_rows, 1)
    params = {
        "threads": 10 * THREADS_PER_ACCOUNT,
        "threads_per_account": THREADS_PER_ACCOUNT,
        "rows": rows,
        "other_rows": other_rows,
        "per_account": max(rows, other_rows, 1),
        "spacing": spacing,
    }
    async with engine.begin() as conn:
        for statement in filter(str.strip, FILL.split(";")):
            await conn.execute(text(statement.format(**params)))


async def _time(repeat: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    await call()  # warm the pool, the plan cache and the buffer cache
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await call()
        times.append(time.perf_counter() - t0)
    return times


async def run(database_url: str, rows: int, other_rows: int, repeat: int) -> dict[str, object]:
    engine = create_async_engine(database_url, poolclass=pool.NullPool)
    await migrate.upgrade(engine)
    t0 = time.perf_counter()
    await _fill(engine, rows, other_rows)
    fill_s = time.perf_counter() - t0
    sessions = create_session_factory(engine)
    results: dict[str, object] = {"rows": rows, "other_rows": other_rows, "fill_s": fill_s}
    async with sessions() as session:
        for group_by in GroupBy:

            async def sql_only(group_by: GroupBy = group_by) -> object:
                return await build_report(session, ACCOUNT, DAYS, group_by)

            async def with_bodies(group_by: GroupBy = group_by) -> object:
                report = await build_report(session, ACCOUNT, DAYS, group_by)
                msgspec.json.encode([sums_values(r.sums) for r in report.rows])
                return report_csv(report)

            report = await build_report(session, ACCOUNT, DAYS, group_by)
            assert report.totals.turns == rows, (report.totals.turns, rows)
            results[group_by.value] = {
                "groups": len(report.rows),
                "sql_s": await _time(repeat, sql_only),
                "with_json_and_csv_s": await _time(repeat, with_bodies),
            }
    await engine.dispose()
    return results


def _print(results: dict[str, object]) -> None:
    print(
        f"billing report over {results['rows']:,} ledger rows of one account "
        f"(+{results['other_rows']:,} of others), 90 days; filled in {results['fill_s']:.1f} s"
    )
    print(f"{'group_by':<9} {'groups':>6} {'sql median':>11} {'sql min':>8} {'+json+csv':>10}")
    for group_by in GroupBy:
        r = results[group_by.value]
        assert isinstance(r, dict)
        sql_ms = [s * 1000 for s in r["sql_s"]]
        full_ms = [s * 1000 for s in r["with_json_and_csv_s"]]
        print(
            f"{group_by.value:<9} {r['groups']:>6} {statistics.median(sql_ms):>8.1f} ms "
            f"{min(sql_ms):>5.1f} ms {statistics.median(full_ms):>7.1f} ms"
        )


async def _in_fresh_database(server_url: str, args: argparse.Namespace) -> dict[str, object]:
    import asyncpg  # the driver SQLAlchemy uses; CREATE DATABASE cannot run in a transaction

    name = f"kvt_bench_{secrets.token_hex(4)}"
    admin_dsn = make_url(server_url).set(drivername="postgresql")
    conn = await asyncpg.connect(admin_dsn.render_as_string(hide_password=False))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        try:
            url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
            return await run(url, args.rows, args.other_rows, args.repeat)
        finally:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="ledger rows of the account")
    parser.add_argument("--other-rows", type=int, default=100_000, help="rows of other accounts")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per figure")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.other_rows < 0 or args.repeat < 1:
        parser.error("--rows and --repeat must be >= 1, --other-rows >= 0")
    settings = load_settings()
    if settings.database_url is not None:
        results = asyncio.run(_in_fresh_database(settings.database_url, args))
    else:
        with throwaway_cluster(settings.pg_bindir) as cluster:
            results = asyncio.run(_in_fresh_database(cluster.url(), args))
    _print(results)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
