"""A bounded load test of the service with its limits on: many accounts and threads, short and
long turns at once, then a check that every thread's books balance.

    python -m bench.load                       # starts a throwaway Postgres and one service
    python -m bench.load --url http://127.0.0.1:8000 --database-url postgresql+asyncpg://...
    python -m bench.load --accounts 6 --threads 3 --turns 6 --concurrency 12 --max-seconds 120

Loopback only, bounded in requests (--max-requests) and time (--max-seconds). The launcher is the
multi-turn benchmark's (bench/multiturn/service.py); the accounts and keys are made directly in
the database (app/db/accounts.py, as `kvthreads keys create` does). Printed: requests, their
statuses, latency p50/p95/p99 of turns, and the checks:

  - every ledger row of the run's threads has input_tokens = cached_tokens + fresh_tokens;
  - per thread, the ledger's sums equal the sums of the usage the 200 responses reported;
  - per thread, GET /v1/threads/{id}/tokens is as long as the thread's token_count, and every
    turn's input_tokens was the previous turn's log (input + output of the turn before, plus the
    new message): the log only ever grows by what the turns added.

Exit status 1 if a check fails (429s are expected: the limits are on). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from app.config import normalize_database_url
from app.db.accounts import create_account_with_key
from app.db.models import UsageRecord
from app.db.session import create_session_factory
from bench.multiturn.service import ServiceInstance, database, prepare_database, running

LIMITS = {  # what the started service runs with: tight enough that the run meets them
    "KVTHREADS_RATE_LIMIT_PER_MINUTE": "20",
    "KVTHREADS_MAX_TURNS_IN_FLIGHT": "2",
    "KVTHREADS_MONTHLY_TOKEN_BUDGET": "10000000",
    "KVTHREADS_KV_CACHE_MB": "64",
}
SHORT, LONG = (4, "Say yes."), (48, "Tell me a long story about a lighthouse keeper and the sea.")
USAGE_FIELDS = ("input_tokens", "cached_tokens", "fresh_tokens", "output_tokens")


@dataclass
class Stats:
    max_requests: int
    sent: int = 0
    statuses: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # error types of non-2xx answers
    turn_ms: list[float] = field(default_factory=list)
    # thread -> usage of each successful turn, in order
    usage: dict[str, list[dict[str, int]]] = field(default_factory=lambda: defaultdict(list))

    def may_send(self) -> bool:
        return self.sent < self.max_requests


async def _request(client: httpx.AsyncClient, stats: Stats, method: str, url: str, **kw):
    stats.sent += 1
    r = await client.request(method, url, **kw)
    stats.statuses[r.status_code] += 1
    if r.status_code >= 400:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            stats.errors[r.json()["error"]["type"]] += 1
    return r


async def _conversation(
    client: httpx.AsyncClient, key: str, turns: int, stats: Stats, rng: random.Random
) -> str | None:
    headers = {"Authorization": f"Bearer {key}"}
    r = None
    while stats.may_send() and (r is None or r.status_code == 429):
        r = await _request(client, stats, "POST", "/v1/threads", json={}, headers=headers)
        if r.status_code == 429:
            await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 2.0))
    if r is None or r.status_code != 201:
        return None
    thread_id = r.json()["id"]
    done = 0
    while done < turns and stats.may_send():
        max_tokens, text = LONG if rng.random() < 0.3 else SHORT
        body = {"content": f"{text} ({done})", "max_tokens": max_tokens, "temperature": 0}
        start = time.perf_counter()
        r = await _request(
            client, stats, "POST", f"/v1/threads/{thread_id}/messages", json=body, headers=headers
        )
        if r.status_code == 200:
            stats.turn_ms.append((time.perf_counter() - start) * 1000)
            stats.usage[thread_id].append(r.json()["usage"])
            done += 1
        elif r.status_code in (409, 429):
            await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 2.0) * rng.random())
        else:
            break
    return thread_id


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _make_keys(database_url: str, num_accounts: int) -> list[str]:
    engine = create_async_engine(database_url)
    try:
        async with create_session_factory(engine).begin() as session:
            return [
                (await create_account_with_key(session, f"load-{i}")).secret
                for i in range(num_accounts)
            ]
    finally:
        await engine.dispose()


async def _check(
    client: httpx.AsyncClient, database_url: str, owners: dict[str, str], stats: Stats
) -> list[str]:
    """The books of every thread of the run; returns what does not balance."""
    problems: list[str] = []
    engine = create_async_engine(database_url)
    try:
        async with create_session_factory(engine)() as session:
            rows = (
                await session.scalars(
                    select(UsageRecord)
                    .where(UsageRecord.thread_id.in_(list(owners)))
                    .order_by(UsageRecord.created_at, UsageRecord.id)
                )
            ).all()
    finally:
        await engine.dispose()
    ledger: dict[str, list[UsageRecord]] = defaultdict(list)
    for row in rows:
        if row.input_tokens != row.cached_tokens + row.fresh_tokens:
            problems.append(f"ledger row {row.id}: input != cached + fresh")
        ledger[row.thread_id].append(row)
    for thread_id, key in owners.items():
        headers = {"Authorization": f"Bearer {key}"}
        responses = stats.usage.get(thread_id, [])
        for name in USAGE_FIELDS:
            billed = sum(getattr(row, name) for row in ledger[thread_id])
            answered = sum(u[name] for u in responses)
            if billed != answered:
                problems.append(f"{thread_id}: ledger {name} {billed} != responses {answered}")
        # Reading back is not load: no rate limit should stop the check, so wait out a 429.
        for _ in range(20):
            detail = await client.get(f"/v1/threads/{thread_id}", headers=headers)
            tokens = await client.get(f"/v1/threads/{thread_id}/tokens", headers=headers)
            if 429 not in (detail.status_code, tokens.status_code):
                break
            await asyncio.sleep(3)
        log = tokens.json()["token_ids"]
        if len(log) != detail.json()["token_count"]:
            problems.append(f"{thread_id}: token log {len(log)} != token_count")
        for before, after in zip(responses, responses[1:], strict=False):
            if after["input_tokens"] <= before["input_tokens"] + before["output_tokens"] - 1:
                problems.append(f"{thread_id}: a turn's input lost the turn before's log")
        if responses and len(log) < responses[-1]["input_tokens"] + responses[-1]["output_tokens"]:
            problems.append(f"{thread_id}: the log is shorter than the last turn's input + output")
    return problems


async def _drive(args: argparse.Namespace, url: str, database_url: str) -> int:
    keys = await _make_keys(database_url, args.accounts)
    stats = Stats(max_requests=args.max_requests)
    rng = random.Random(args.seed)
    owners: dict[str, str] = {}
    limit = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=args.max_seconds) as client:

        async def one(key: str) -> None:
            async with limit:
                thread_id = await _conversation(client, key, args.turns, stats, rng)
            if thread_id is not None:
                owners[thread_id] = key

        jobs = [one(key) for key in keys for _ in range(args.threads)]
        rng.shuffle(jobs)
        start = time.perf_counter()
        tasks = [asyncio.create_task(job) for job in jobs]
        _, pending = await asyncio.wait(tasks, timeout=args.max_seconds)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        elapsed = time.perf_counter() - start
        problems = await _check(client, database_url, owners, stats)

    turns = len(stats.turn_ms)
    print(f"accounts {args.accounts}, threads {len(owners)}, turns {turns} in {elapsed:.1f} s"
          f"{' (stopped at --max-seconds)' if pending else ''}")  # fmt: skip
    print(f"requests {stats.sent}: " + ", ".join(f"{s}: {n}" for s, n in sorted(stats.statuses.items())))  # fmt: skip
    print("errors by type: " + (", ".join(f"{t}: {n}" for t, n in stats.errors.most_common()) or "none"))  # fmt: skip
    print(f"turn latency ms: p50 {_percentile(stats.turn_ms, 0.5):.0f}, "
          f"p95 {_percentile(stats.turn_ms, 0.95):.0f}, p99 {_percentile(stats.turn_ms, 0.99):.0f}")  # fmt: skip
    ledger_rows = sum(len(u) for u in stats.usage.values())
    print(f"checks: {ledger_rows} turns' usage against the ledger, {len(owners)} token logs: "
          + ("all balance" if not problems else f"{len(problems)} problems"))  # fmt: skip
    for problem in problems[:20]:
        print("  " + problem)
    bad_status = [s for s in stats.statuses if s >= 500]
    return 1 if problems or bad_status else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--url", help="a running service (loopback); default: start one")
    parser.add_argument("--database-url", help="its database (needed with --url)")
    parser.add_argument("--accounts", type=int, default=6)
    parser.add_argument("--threads", type=int, default=3, help="threads per account")
    parser.add_argument("--turns", type=int, default=6, help="turns per thread")
    parser.add_argument("--concurrency", type=int, default=12, help="conversations at once")
    parser.add_argument("--max-requests", type=int, default=600)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.url:
        if not args.database_url:
            parser.error("--url needs --database-url (the accounts are made in the database)")
        host = httpx.URL(args.url).host
        if host not in ("127.0.0.1", "localhost", "::1"):
            parser.error("--url must be a loopback address")
        return asyncio.run(_drive(args, args.url, normalize_database_url(args.database_url)))
    with database(args.database_url) as database_url:
        prepare_database(database_url)
        with tempfile.TemporaryDirectory(prefix="kvthreads-load-") as tmp:
            instance = ServiceInstance("load", dict(LIMITS), database_url, Path(tmp) / "serve.log")
            print("limits: " + ", ".join(f"{k}={v}" for k, v in LIMITS.items()))
            with running([instance]):
                url = normalize_database_url(database_url)
                return asyncio.run(_drive(args, instance.url, url))


if __name__ == "__main__":
    sys.exit(main())
