"""A turn's ledger row: its tokens, the unit prices it was billed at, its cost, its timings."""

from decimal import Decimal

from app.billing.ledger import TurnTokens, usage_row
from app.billing.prices import UnitPrices

PRICES = UnitPrices(fresh_input=Decimal("0.5"), cached_input=Decimal("0.1"), output=Decimal("2"))


def test_the_row_keeps_its_prices_and_its_exact_cost():
    tokens = TurnTokens(input_tokens=12, cached_tokens=8, fresh_tokens=4, output_tokens=5)
    row = usage_row(
        "acc_1", "thr_1", "m", PRICES, tokens, miss_reason=None, timings={}, idempotency_key="k"
    )
    assert row.id.startswith("usg_")
    assert (row.account_id, row.thread_id, row.model, row.idempotency_key) == (
        "acc_1",
        "thr_1",
        "m",
        "k",
    )
    assert (row.input_tokens, row.cached_tokens, row.fresh_tokens, row.output_tokens) == (
        12,
        8,
        4,
        5,
    )
    assert (row.price_fresh_input, row.price_cached_input, row.price_output) == (
        Decimal("0.5"),
        Decimal("0.1"),
        Decimal("2"),
    )
    assert row.cost == Decimal("0.0000128")  # (8 * 0.1 + 4 * 0.5 + 5 * 2) / 1e6
    assert row.miss_reason is None
    assert (row.queue_ms, row.ttft_ms, row.total_ms) == (None, None, None)


def test_timings_are_stored_in_milliseconds_and_missing_ones_stay_empty():
    tokens = TurnTokens(input_tokens=3, cached_tokens=0, fresh_tokens=3, output_tokens=1)
    row = usage_row(
        "acc_1",
        None,
        "m",
        PRICES,
        tokens,
        miss_reason="new_thread",
        timings={"queue_s": 0.002, "total_s": 1.5},
    )
    assert (row.queue_ms, row.ttft_ms, row.total_ms) == (2.0, None, 1500.0)
    assert row.thread_id is None and row.miss_reason == "new_thread"
