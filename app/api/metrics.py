"""GET /metrics: Prometheus text exposition (format 0.0.4) for operators.

Two sources:
- the ledger (SQL sums over all accounts, per model; only with a metrics token, see below): turns and tokens billed, cached / fresh /
  output. They survive restarts and agree across server processes sharing the database.
- this process's KV cache counters (the engine's stats()): hits, misses by reason, evictions,
  tokens served from the cache and computed, resident and pinned threads, blocks in use, and
  sharing: blocks held by several threads, logical versus unique KV tokens; and the KV tiers
  (device, host, disk): bytes and threads held, hits, offloads and restores (count, bytes,
  seconds), evictions, disk snapshots refused by reason.
  Counters restart at zero with the process, as Prometheus expects of counters.

- this process's committed turns as histograms: queue time, time to first token, time per
  output token, turn latency, input and output tokens per turn.

Access: with KVTHREADS_METRICS_TOKEN set, a scrape must send `Authorization: Bearer <token>`
(401 otherwise) and sees the ledger's totals too. Unset, /metrics is open and shows the engine's
counters only: volumes of this process, no ledger totals (bind it to a private network anyway).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

from litestar import MediaType, Request, Response, get
from litestar.datastructures import State
from litestar.di import NamedDependency

from app.api.billing import BILLING_DEPENDENCIES
from app.billing.service import BillingService
from app.kvcache.stats import KVCacheStats

CONTENT_TYPE = "text/plain; version=0.0.4"  # Litestar adds "; charset=utf-8"
Sample = tuple[dict[str, str], int | float]


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Exposition:
    """Families of samples, written as `# HELP`, `# TYPE` and one line per sample."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            body = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{body}}} {value}" if body else f"{name} {value}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


# name, type, help, KVCacheStats field: one unlabelled sample each.
ENGINE_SCALARS = (
    ("kvthreads_kv_hits_total", "counter",
     "Committed turns that reused their whole history's KV (counted at commit).", "hits"),
    ("kvthreads_kv_evictions_total", "counter",
     "Resident threads evicted whole to make room.", "evictions"),
    ("kvthreads_kv_preemptions_total", "counter",
     "In-flight threads whose blocks were taken back under pressure.", "preemptions"),
    ("kvthreads_kv_cached_tokens_total", "counter",
     "Prompt tokens served from resident KV.", "cached_tokens"),
    ("kvthreads_kv_computed_tokens_total", "counter",
     "Tokens run through the model: prefill, decode and recompute.", "computed_tokens"),
    ("kvthreads_kv_resident_threads", "gauge",
     "Threads holding KV blocks now, in flight or not.", "num_resident_threads"),
    ("kvthreads_kv_pinned_threads", "gauge",
     "Threads with a turn in flight (never evicted).", "num_pinned_threads"),
    ("kvthreads_kv_shared_tokens_total", "counter",
     "Of the cached prompt tokens, those in KV blocks shared with other threads.",
     "shared_tokens"),
    ("kvthreads_kv_block_copies_total", "counter",
     "Partial KV blocks copied on write (fork, rewind, a shared tail).", "block_copies"),
    ("kvthreads_kv_logical_tokens", "gauge",
     "KV tokens the resident threads hold, each thread counted apart.", "logical_tokens"),
    ("kvthreads_kv_unique_tokens", "gauge",
     "KV tokens the pool stores: shared blocks counted once.", "unique_tokens"),
    ("kvthreads_kv_block_size_tokens", "gauge", "Tokens per KV block.", "block_size"),
    ("kvthreads_kv_residency_enabled", "gauge",
     "1 when threads keep their KV between turns, 0 in recompute mode.", "residency"),
)  # fmt: skip


def _add_engine(out: Exposition, stats: KVCacheStats) -> None:
    for name, kind, help_text, field in ENGINE_SCALARS:
        out.add(name, kind, help_text, [({}, int(getattr(stats, field)))])
    out.add(
        "kvthreads_kv_misses_total",
        "counter",
        "Committed turns that could not reuse their whole history's KV, by reason.",
        (({"reason": reason}, n) for reason, n in sorted(stats.misses.items())),
    )
    out.add(
        "kvthreads_kv_blocks",
        "gauge",
        "KV blocks of the pool, by state.",
        [
            ({"state": "used"}, stats.num_used_blocks),
            ({"state": "shared"}, stats.num_shared_blocks),
            ({"state": "free"}, stats.num_free_blocks),
            ({"state": "free_cached"}, stats.num_cached_free_blocks),
        ],
    )
    out.add(
        "kvthreads_kv_sharing_ratio",
        "gauge",
        "Logical over unique KV tokens (1: nothing shared).",
        [({}, round(stats.sharing_ratio, 6))],
    )
    out.add("kvthreads_kv_pool_blocks_total", "gauge", "KV blocks in the device pool.",
            [({}, stats.num_blocks)])  # fmt: skip
    out.add(
        "kvthreads_kv_pool_usage_ratio",
        "gauge",
        "Fraction of the device pool's KV blocks in use.",
        [({}, round(stats.num_used_blocks / stats.num_blocks, 6) if stats.num_blocks else 0)],
    )


HISTOGRAMS = {
    "queue_seconds": "Seconds from a turn's arrival to its first scheduled step.",
    "ttft_seconds": "Seconds from a turn's arrival to its first generated token.",
    "tpot_seconds": "Seconds per output token after the first (decode time over tokens).",
    "turn_seconds": "Seconds from a turn's arrival to its last token.",
    "input_tokens": "Tokens a turn conditioned on (history and the new message).",
    "output_tokens": "Tokens a turn generated.",
}


def _add_histograms(out: Exposition, histograms: dict[str, Any]) -> None:
    """The engine's turn_histograms() (app/engine/runtime/turn_metrics.py), committed turns."""
    for key, help_text in HISTOGRAMS.items():
        h = histograms[key]
        name = f"kvthreads_turn_{key}"
        out.lines.append(f"# HELP {name} {help_text}")
        out.lines.append(f"# TYPE {name} histogram")
        bounds = [format(b, "g") for b in h.buckets] + ["+Inf"]
        for bound, n in zip(bounds, h.counts, strict=True):
            out.lines.append(f'{name}_bucket{{le="{bound}"}} {n}')
        out.lines.append(f"{name}_sum {round(h.sum, 6)}")
        out.lines.append(f"{name}_count {h.count}")


def _authorized(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.encode(), token.encode())


def _add_tiers(out: Exposition, stats: Any) -> None:
    """The engine's tier_stats() (app/engine/runtime/kv_hierarchy.py TierStats), duck-typed."""
    tiers = stats.tiers.items()
    out.add("kvthreads_kv_tier_bytes", "gauge", "KV bytes held, by tier.",
            (({"tier": t}, s.bytes) for t, s in tiers))  # fmt: skip
    out.add("kvthreads_kv_tier_capacity_bytes", "gauge", "KV bytes each tier may hold.",
            (({"tier": t}, s.capacity_bytes) for t, s in tiers))  # fmt: skip
    out.add("kvthreads_kv_tier_threads", "gauge", "Threads whose KV is held, by tier.",
            (({"tier": t}, s.threads) for t, s in tiers))  # fmt: skip
    families = (
        ("kvthreads_kv_tier_hits_total", "counter",
         "Turns whose cached tokens came from the tier.", stats.hits),
        ("kvthreads_kv_offloads_total", "counter",
         "Threads moved down into the tier.", stats.offloads),
        ("kvthreads_kv_offload_bytes_total", "counter",
         "KV bytes copied down into the tier (blocks it already held are not copied).",
         stats.offload_bytes),
        ("kvthreads_kv_offload_seconds_total", "counter",
         "Seconds spent moving threads down into the tier (disk: queuing the write).",
         stats.offload_seconds),
        ("kvthreads_kv_restores_total", "counter",
         "Threads copied back from the tier into the device pool.", stats.restores),
        ("kvthreads_kv_restore_bytes_total", "counter",
         "KV bytes copied back from the tier.", stats.restore_bytes),
        ("kvthreads_kv_restore_seconds_total", "counter",
         "Seconds spent restoring from the tier (disk: reading and checking included).",
         stats.restore_seconds),
        ("kvthreads_kv_tier_evictions_total", "counter",
         "Threads pushed out of the tier (down one, or out of the last: recomputed).",
         stats.evictions),
    )  # fmt: skip
    for name, kind, help_text, values in families:
        out.add(name, kind, help_text, (({"tier": t}, v) for t, v in values.items()))
    out.add(
        "kvthreads_kv_snapshots_refused_total",
        "counter",
        "Disk snapshots refused and deleted, by reason.",
        (({"reason": r}, n) for r, n in sorted(stats.snapshots_refused.items())),
    )


@get(
    "/metrics",
    operation_id="metrics",
    tags=["operations"],
    media_type=MediaType.TEXT,
    dependencies=BILLING_DEPENDENCIES,
)
async def metrics(
    request: Request, state: State, billing: NamedDependency[BillingService]
) -> Response[Any]:
    token = state.settings.metrics_token
    if not _authorized(request, token):
        return Response(
            {"error": {"type": "unauthorized", "message": "a valid metrics token is required"}},
            status_code=401,
            media_type=MediaType.JSON,
            headers={"WWW-Authenticate": "Bearer"},
        )
    out = Exposition()
    engine = state.runtime.engine  # app.state.runtime: the ModelRuntime
    _add_engine(out, engine.stats())
    if (tier_stats := getattr(engine, "tier_stats", None)) is not None:
        _add_tiers(out, tier_stats())
    if (turn_histograms := getattr(engine, "turn_histograms", None)) is not None:
        _add_histograms(out, turn_histograms())
    if token is not None:  # ledger totals (every account's) only to an authenticated scrape
        await _add_ledger(out, billing)
    return Response(out.text(), media_type=CONTENT_TYPE)


async def _add_ledger(out: Exposition, billing: BillingService) -> None:
    totals = await billing.ledger_totals()
    out.add(
        "kvthreads_ledger_turns_total",
        "counter",
        "Turns billed in the usage ledger, all accounts, by model.",
        (({"model": t.model}, t.turns) for t in totals),
    )
    out.add(
        "kvthreads_ledger_tokens_total",
        "counter",
        "Tokens billed in the usage ledger, all accounts, by model and kind "
        "(cached and fresh input, output).",
        (
            ({"model": t.model, "kind": kind}, getattr(t, f"{kind}_tokens"))
            for t in totals
            for kind in ("cached", "fresh", "output")
        ),
    )
