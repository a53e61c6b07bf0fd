"""The billing report on ledger rows written directly (tests/billing_ledger.py), in real Postgres.

The reconciliation through real HTTP turns is tests/e2e/test_billing_reconcile.py.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from app.billing.prices import UnitPrices
from app.billing.report import DayRange, GroupBy, ReportError, UsageSums, build_report
from app.db.models import Thread
from tests.billing_ledger import add_turn, new_account, new_thread

CHEAP = UnitPrices(Decimal("0.10"), Decimal("0"), Decimal("0.30"))
DEAR = UnitPrices(Decimal("2.5"), Decimal("0.0125"), Decimal("7.0001"))
RANGE = DayRange.parse("2026-03-01", "2026-03-07")


def _expected(rows) -> UsageSums:
    return UsageSums(
        turns=len(rows),
        input_tokens=sum(r.input_tokens for r in rows),
        cached_tokens=sum(r.cached_tokens for r in rows),
        fresh_tokens=sum(r.fresh_tokens for r in rows),
        output_tokens=sum(r.output_tokens for r in rows),
        cost=sum((r.cost for r in rows), Decimal(0)),
        cost_without_cache=sum(
            (
                (r.input_tokens * r.price_fresh_input + r.output_tokens * r.price_output)
                / 1_000_000
                for r in rows
            ),
            Decimal(0),
        ),
    )


def _add_up(sums: list[UsageSums]) -> UsageSums:
    return UsageSums(
        *(sum(getattr(s, f) for s in sums) for f in ("turns", "input_tokens", "cached_tokens")),
        *(sum(getattr(s, f) for s in sums) for f in ("fresh_tokens", "output_tokens")),
        cost=sum((s.cost for s in sums), Decimal(0)),
        cost_without_cache=sum((s.cost_without_cache for s in sums), Decimal(0)),
    )


async def _random_ledger(session, account_id: str, rng: random.Random, num_turns: int):
    threads = [
        (await new_thread(session, account_id, model), model)
        for model in ("builtin-tiny-random", "builtin-tiny-random", "llama-3-8b")
    ]
    rows = []
    for _ in range(num_turns):
        thread_id, model = rng.choice(threads)
        # Days 0..6 of the range, and some turns outside it on either side.
        at = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(-86400, 8 * 86400))
        rows.append(
            add_turn(
                session,
                account_id=account_id,
                thread_id=thread_id,
                model=model,
                cached=rng.randrange(0, 5000),
                fresh=rng.randrange(1, 700),
                output=rng.randrange(0, 300),
                prices=rng.choice((CHEAP, DEAR)),
                at=at,
            )
        )
    await session.commit()
    lo, hi = RANGE.bounds()
    return [r for r in rows if lo <= r.created_at < hi]


async def test_totals_equal_the_ledger_and_every_grouping_adds_up(db_session):
    rng = random.Random(6)
    account = await new_account(db_session)
    in_range = await _random_ledger(db_session, account, rng, num_turns=80)
    expected = _expected(in_range)
    assert 0 < len(in_range) < 80  # some turns fall outside the range

    for group_by in GroupBy:
        report = await build_report(db_session, account, RANGE, group_by)
        assert report.totals == expected, group_by
        assert _add_up([row.sums for row in report.rows]) == expected, group_by
        assert report.totals.saved == expected.cost_without_cache - expected.cost

    by_day = await build_report(db_session, account, RANGE, GroupBy.DAY)
    assert [row.key for row in by_day.rows] == [d.isoformat() for d in RANGE.days()]
    for row in by_day.rows:
        that_day = [r for r in in_range if r.created_at.date().isoformat() == row.key]
        assert row.sums == _expected(that_day)
    by_model = await build_report(db_session, account, RANGE, GroupBy.MODEL)
    assert [row.key for row in by_model.rows] == ["builtin-tiny-random", "llama-3-8b"]


async def test_days_are_utc_and_the_end_day_is_included(db_session):
    account = await new_account(db_session)
    thread = await new_thread(db_session, account, "m")
    moments = [
        datetime(2026, 3, 1, 0, 0, tzinfo=UTC) - timedelta(microseconds=1),  # the day before
        datetime(2026, 3, 1, 0, 0, tzinfo=UTC),  # first instant of the range
        # 23:30 on Mar 7 in New York is 04:30 UTC on Mar 8: outside the range.
        datetime.fromisoformat("2026-03-07T23:30:00-05:00"),
        datetime(2026, 3, 7, 23, 59, 59, 999999, tzinfo=UTC),  # last instant of the range
    ]
    for at in moments:
        add_turn(db_session, account_id=account, thread_id=thread, model="m", cached=0, fresh=10,
                 output=1, prices=CHEAP, at=at)  # fmt: skip
    await db_session.commit()
    report = await build_report(db_session, account, RANGE, GroupBy.DAY)
    assert report.totals.turns == 2
    turns = {row.key: row.sums.turns for row in report.rows if row.sums.turns}
    assert turns == {"2026-03-01": 1, "2026-03-07": 1}


async def test_old_turns_keep_the_prices_they_were_billed_at(db_session):
    account = await new_account(db_session)
    thread = await new_thread(db_session, account, "m")
    turn = dict(account_id=account, thread_id=thread, model="m", cached=1000, fresh=500, output=100)
    add_turn(db_session, **turn, prices=CHEAP, at=datetime(2026, 3, 2, 12, tzinfo=UTC))
    add_turn(db_session, **turn, prices=DEAR, at=datetime(2026, 3, 3, 12, tzinfo=UTC))
    await db_session.commit()
    report = await build_report(db_session, account, RANGE, GroupBy.DAY)
    by_day = {row.key: row.sums for row in report.rows}
    # 500 fresh x 0.10 + 100 out x 0.30, per million tokens: 0.00008; without cache 1500 x 0.10
    # + 100 x 0.30 = 0.00018.
    assert by_day["2026-03-02"].cost == Decimal("0.00008")
    assert by_day["2026-03-02"].cost_without_cache == Decimal("0.00018")
    # 1000 x 0.0125 + 500 x 2.5 + 100 x 7.0001 = 1962.51 per million.
    assert by_day["2026-03-03"].cost == Decimal("0.00196251")
    assert by_day["2026-03-03"].cost_without_cache == Decimal("0.00445001")
    assert report.totals.cost == Decimal("0.00204251")
    assert report.totals.saved == Decimal("0.00018") + Decimal("0.00445001") - Decimal("0.00204251")


async def test_an_account_never_sees_another_accounts_turns(db_session):
    rng = random.Random(7)
    mine = await new_account(db_session, "mine")
    theirs = await new_account(db_session, "theirs")
    my_rows = await _random_ledger(db_session, mine, rng, num_turns=20)
    their_rows = await _random_ledger(db_session, theirs, rng, num_turns=30)
    for account, rows in ((mine, my_rows), (theirs, their_rows)):
        for group_by in GroupBy:
            report = await build_report(db_session, account, RANGE, group_by)
            assert report.totals == _expected(rows)
        by_thread = await build_report(db_session, account, RANGE, GroupBy.THREAD)
        assert {row.key for row in by_thread.rows} == {r.thread_id for r in rows}
    nobody = await build_report(db_session, "acct_nobody", RANGE, GroupBy.THREAD)
    assert nobody.rows == [] and nobody.totals.turns == 0 and nobody.totals.cost == 0


async def test_a_deleted_threads_turns_stay_billed_under_no_thread(db_session):
    account = await new_account(db_session)
    thread = await new_thread(db_session, account, "m")
    add_turn(db_session, account_id=account, thread_id=thread, model="m", cached=5, fresh=5,
             output=5, prices=DEAR, at=datetime(2026, 3, 4, tzinfo=UTC))  # fmt: skip
    await db_session.commit()
    before = await build_report(db_session, account, RANGE, GroupBy.THREAD)
    await db_session.delete(await db_session.get(Thread, thread))
    await db_session.commit()
    after = await build_report(db_session, account, RANGE, GroupBy.THREAD)
    assert [row.key for row in after.rows] == [None]
    assert after.totals == before.totals


async def test_grouping_a_decade_by_day_is_refused(db_session):
    with pytest.raises(ReportError, match="too long to group by day"):
        await build_report(
            db_session, "acct_x", DayRange.parse("2000-01-01", "2026-01-01"), GroupBy.DAY
        )
    long = await build_report(
        db_session, "acct_x", DayRange.parse("2000-01-01", "2026-01-01"), GroupBy.MODEL
    )
    assert long.rows == []
