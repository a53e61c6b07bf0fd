"""The usage ledger's row for one turn: its token counts, priced with the prices in force.

    tokens = TurnTokens(input_tokens=12, cached_tokens=8, fresh_tokens=4, output_tokens=5)
    row = usage_row(
        account_id, thread_id, model, prices.for_model(model), tokens,
        miss_reason=None, timings={"queue_s": 0.001, "ttft_s": 0.02, "total_s": 0.1},
    )
    session.add(row)    # in the turn's own transaction, beside its two messages

The row keeps the unit prices it was billed at beside its cost, so a later price change never
rewrites an old bill (the reports sum the stored cost and prices, app/billing/report.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from app.billing.prices import UnitPrices
from app.db import ids
from app.db.models import UsageRecord


@dataclasses.dataclass(frozen=True)
class TurnTokens:
    """One turn's tokens, named as the ledger and the response name them."""

    input_tokens: int  # what the model conditioned on: cached + fresh
    cached_tokens: int  # served from the KV cache
    fresh_tokens: int  # computed this turn
    output_tokens: int  # generated
    shared_tokens: int = 0  # of the cached ones, those in KV blocks other threads hold too


def usage_row(
    account_id: str,
    thread_id: str | None,
    model: str,
    unit: UnitPrices,
    tokens: TurnTokens,
    *,
    miss_reason: str | None,
    timings: Mapping[str, float],
    idempotency_key: str | None = None,
    cache_tier: str | None = None,
) -> UsageRecord:
    """The turn's ledger row, its cost computed from `unit`; `timings` in seconds (queue_s,
    ttft_s, total_s; any may be missing) are stored in milliseconds."""
    cost = unit.cost(
        cached_tokens=tokens.cached_tokens,
        fresh_tokens=tokens.fresh_tokens,
        output_tokens=tokens.output_tokens,
    )
    return UsageRecord(
        id=ids.new_id(ids.USAGE),
        account_id=account_id,
        thread_id=thread_id,
        model=model,
        **dataclasses.asdict(tokens),
        miss_reason=miss_reason,
        cache_tier=cache_tier if tokens.cached_tokens else None,
        price_fresh_input=unit.fresh_input,
        price_cached_input=unit.cached_input,
        price_output=unit.output,
        cost=cost,
        queue_ms=_ms(timings.get("queue_s")),
        ttft_ms=_ms(timings.get("ttft_s")),
        total_ms=_ms(timings.get("total_s")),
        idempotency_key=idempotency_key,
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0
