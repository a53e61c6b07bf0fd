"""Compute the KV of conversation items ahead of the response that will read them.

    await prefill(runtime, conn, prices, account_id, thread_id, history_ids, item_ids,
                  first_turn=False)

Called under the thread's turn lock right after the items were committed to the log. When the
engine is idle (no turn in flight: spare capacity), it runs the items as a prefill-only turn:
one token is sampled and dropped, and `commit_turn` keeps the KV of the prompt alone (the engine
keeps prompt + generated[:-1]), which is exactly the log the database holds. The compute is
billed as it happens, one ledger row with output_tokens 0; the next response finds the items
cached and pays for little more than its decode. A busy engine, or any failure, skips it: the
next turn computes the items then, as it would have anyway.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncConnection

from app.billing.ledger import TurnTokens, usage_row
from app.billing.prices import PriceBook
from app.engine.runtime.types import FinishEvent, SamplingParams
from app.threads.ports import ModelRuntime
from app.threads.shield import run_to_completion
from app.threads.turn_lock import session_on

log = logging.getLogger(__name__)

PREFILL = SamplingParams(max_tokens=1, temperature=0.0)


def has_spare_capacity(runtime: ModelRuntime) -> bool:
    stats = getattr(runtime.engine, "stats", None)
    return stats is not None and stats().num_pinned_threads == 0


async def prefill(
    runtime: ModelRuntime,
    conn: AsyncConnection,
    prices: Callable[[], PriceBook],
    account_id: str,
    thread_id: str,
    history_ids: list[int],
    new_ids: list[int],
    *,
    first_turn: bool,
) -> bool:
    """True when the items' KV was computed and kept (and billed)."""
    if not new_ids or not has_spare_capacity(runtime):
        return False
    engine = runtime.engine
    try:
        stream = engine.generate(
            thread_id,
            history_ids,
            new_ids,
            PREFILL,
            first_turn=first_turn,
            share_scope=runtime.share_scope(account_id),
        )
    except Exception:
        log.warning("prefill of thread %s not started", thread_id, exc_info=True)
        return False
    finish = None
    try:
        async for event in stream:
            if isinstance(event, FinishEvent):
                finish = event
                break
    except Exception:
        log.warning("prefill of thread %s failed", thread_id, exc_info=True)
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await run_to_completion(aclose())
    if finish is None:
        return False
    counts = finish.counts
    tokens = TurnTokens(
        input_tokens=counts.prompt_tokens,
        cached_tokens=counts.cached_tokens,
        fresh_tokens=counts.computed_tokens,
        output_tokens=0,  # the sampled token is dropped: it is not in the log
        shared_tokens=counts.shared_tokens,
    )
    try:
        async with session_on(conn) as session, session.begin():
            session.add(
                usage_row(
                    account_id,
                    thread_id,
                    runtime.name,
                    prices().for_model(runtime.name),
                    tokens,
                    miss_reason=None if counts.miss_reason is None else counts.miss_reason.value,
                    timings=finish.timings,
                )
            )
    except BaseException:
        engine.rollback_turn(thread_id)
        raise
    engine.commit_turn(thread_id, num_log_tokens=len(history_ids) + len(new_ids))
    return True
