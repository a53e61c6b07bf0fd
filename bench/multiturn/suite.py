"""One benchmark invocation: both modes, every chosen profile, the JSON, the plot and the tables.

services   a throwaway database, one key, and per pool size a `cache` instance
           (KVTHREADS_RESIDENCY=on) and a `recompute` instance (off); or running ones by URL
warm-up    one short thread per instance, not measured (first-call allocations, lazy imports)
runs       for each profile: the same workload (same seed) in `cache`, then in `recompute`
           (pressure with --tiers both: also in `cache` on an instance with the KV tiers off)
outputs    bench/out/multiturn-<stamp>.json (every turn) and .png; the tables on stdout
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import platform
import subprocess
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx

from bench.multiturn import service, sizing
from bench.multiturn.client import HttpSender
from bench.multiturn.driver import play
from bench.multiturn.ledger import attach_server_timings
from bench.multiturn.records import MODES, RunResult
from bench.multiturn.report import (
    LATE_TURN,
    format_profile,
    format_summary,
    speedup,
    summarize,
)
from bench.multiturn.workloads import PROFILES, Profile, Span, Workload, build_workload

# CPU defaults: sized so that `make bench` (both modes, four profiles, the bench-size model on
# two cores) ends within about ten minutes; decoding (~20-40 tokens/s) and recomputing long
# histories (a few hundred tokens/s) are what cost. The shapes are the issue's, smaller:
#   chat      2 conversations of 4-8 turns (the 2-8 without the short ones, which never
#             reach turn 4, where the figure is taken); replies asked at ~300 tokens so that they
#             come out at ~200, as the random model ends a reply at its end token with
#             probability ~1/320 per token. Chat's history, not its new message, is what the cache
#             saves, so its replies keep the length.
#   long      2 conversations, documents at the low end of the range, 4 turns
#   agent     2 conversations of 10 turns
#   pressure  6 interleaved conversations
# long/agent/pressure replies are short (20-60 tokens). `--sizes full` plays PROFILES as they are.
DEFAULT_MODEL = "builtin-bench-random"
SHORT_REPLIES = Span(20, 60, 30)
CPU_PROFILES: dict[str, Profile] = {
    "chat": replace(
        PROFILES["chat"],
        num_conversations=2,
        num_turns=Span(4, 8, 6),
        reply_tokens=Span(150, 450, 300),
        description="4-8 turns, user ~70 tokens, replies ~200 tokens (CPU size)",
    ),
    "long": replace(
        PROFILES["long"],
        num_conversations=2,
        num_turns=Span(4, 4, 4),
        first_user_tokens=Span(2000, 2200, 2000),
        reply_tokens=SHORT_REPLIES,
        description="a 2,000-2,200 token document, then short turns (CPU size)",
    ),
    "agent": replace(
        PROFILES["agent"],
        num_conversations=2,
        num_turns=Span(10, 10, 10),
        first_user_tokens=Span(150, 300, 200),
        reply_tokens=SHORT_REPLIES,
    ),
    "pressure": replace(
        PROFILES["pressure"],
        num_conversations=6,
        num_turns=Span(3, 4, 3),
        reply_tokens=SHORT_REPLIES,
    ),
}
# Two chat conversations at a time: on this CPU a decode step costs ~20 ms more per sequence in
# the batch, and a new turn waits for the step in flight and shares its own, so more concurrency
# buys little throughput and adds to every turn's time to first token.
DEFAULT_CONCURRENCY = {"chat": 2, "long": 2, "agent": 2, "pressure": 3}
DEFAULT_REPLY_SCALE = 1.0
PRESSURE_POOL_FRACTION = 0.5
TARGET_SPEEDUP = {"chat": 5.0, "long": 10.0}  # the bar for turns >= LATE_TURN
REQUEST_TIMEOUT_S = 900


@dataclass
class SuiteOptions:
    profiles: list[str] = field(default_factory=lambda: list(PROFILES))
    full_sizes: bool = False  # PROFILES as the issue states them, not CPU_PROFILES
    seed: int = 0
    scale: float = 1.0
    reply_scale: float = DEFAULT_REPLY_SCALE
    concurrency: int | None = None  # None: DEFAULT_CONCURRENCY per profile
    model: str = DEFAULT_MODEL
    device: str = "cpu"
    temperature: float = 1.0
    max_batch_tokens: int | None = None  # None: the service's default
    kv_cache_mb: int | None = None  # None: sized from the workloads
    pressure_kv_cache_mb: int | None = None
    database_url: str | None = None
    urls: dict[str, str] | None = None  # mode -> base URL of a running service
    api_key: str | None = None
    out_dir: Path = Path("bench/out")
    plot_copy: Path | None = None  # also write the plot here (the README's copy)
    warmup: bool = True
    # KV tiers of the cache instances: on, off, or both (pressure also on a tiers-off instance).
    tiers: str = "both"

    def concurrency_for(self, profile: str) -> int:
        return self.concurrency or DEFAULT_CONCURRENCY.get(profile, 4)


@dataclass
class SuiteResult:
    meta: dict
    pairs: list[tuple[RunResult, RunResult]]
    json_path: Path
    plot_path: Path | None
    tiers_off: dict[str, RunResult] = field(default_factory=dict)  # profile -> cache, tiers off

    @property
    def ok(self) -> bool:
        """Every turn answered and the fresh-token check held in every run."""
        for runs in [*self.pairs, self.tiers_off.values()]:
            for run in runs:
                s = summarize(run)
                if s.errors or not s.fresh_check.ok:
                    return False
        return True


def model_kv_bytes_per_token(model: str, device: str) -> int:
    """KV bytes one token takes in the service's pool (the dtype it picks on that device)."""
    import torch

    from app.engine.loading import builtin
    from app.engine.loading.hf_config import read_hf_config
    from app.engine.network.kv_pool import bytes_per_block

    config = (
        builtin.builtin_config(model) if builtin.is_builtin(model) else read_hf_config(Path(model))
    )
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    # The service keeps float32 on the CPU and a 16-bit dtype on an accelerator (loading/loader.py).
    dtype = torch.float32 if on_cpu else torch.bfloat16
    return bytes_per_block(config, 1, dtype)


def machine_description() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "commit": commit,
    }


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {name{labels}: value} for the kvthreads_kv_* samples."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("kvthreads_kv_"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


async def _counters(client: httpx.AsyncClient) -> dict[str, float]:
    response = await client.get("/metrics")
    return parse_metrics(response.text) if response.status_code == 200 else {}


async def _play_mode(
    workload: Workload, mode: str, url: str, options: SuiteOptions, settings: dict
) -> RunResult:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    headers = {"Authorization": f"Bearer {options.api_key}"}
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=REQUEST_TIMEOUT_S, limits=limits
    ) as client:
        before = await _counters(client)
        run = await play(
            workload,
            HttpSender(client, temperature=options.temperature),
            mode=mode,
            concurrency=options.concurrency_for(workload.profile.name),
            settings=settings,
        )
        after = await _counters(client)
    counters = {  # counters, labelled ones included (name{labels})
        k: after[k] - before.get(k, 0) for k in after if k.split("{")[0].endswith("_total")
    }
    run.settings["server_counters"] = counters
    for name in ("evictions", "preemptions"):
        if f"kvthreads_kv_{name}_total" in counters:
            run.settings[name] = counters[f"kvthreads_kv_{name}_total"]
    return run


async def _warm_up(url: str, options: SuiteOptions) -> None:
    """Two short turns on a throwaway thread: lazy imports and first allocations, unmeasured."""
    workload = build_workload("agent", seed=10_000 + options.seed, scale=0.01, reply_scale=0.1)
    first = workload.conversations[0]
    short = replace(workload, conversations=(replace(first, turns=first.turns[:2]),))
    run = await _play_mode(short, "cache", url, options, {})
    failed = [r.error for r in run.turns if not r.ok]
    if failed:
        raise service.LaunchError(f"warm-up turn on {url} failed: {failed[0]}")


def run_suite(options: SuiteOptions, log=print) -> SuiteResult:
    for name in options.profiles:
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r}; choose from {', '.join(PROFILES)}")
    sized = PROFILES if options.full_sizes else CPU_PROFILES
    workloads = {
        name: build_workload(
            sized[name], options.seed, scale=options.scale, reply_scale=options.reply_scale
        )
        for name in options.profiles
    }
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    options.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_description(),
        "model": options.model,
        "device": options.device,
        "seed": options.seed,
        "scale": options.scale,
        "reply_scale": options.reply_scale,
        "sizes": "full" if options.full_sizes else "cpu",
        "temperature": options.temperature,
        "profiles": {
            name: {
                "description": w.profile.description,
                "conversations": len(w.conversations),
                "turns": w.num_turns,
                "concurrency": options.concurrency_for(name),
            }
            for name, w in workloads.items()
        },
    }
    with ExitStack() as stack:
        urls, database_url = _service_urls(options, workloads, meta, stack, stamp, log)
        if options.warmup:
            for url in {u for by_mode in urls.values() for u in by_mode.values()}:
                asyncio.run(_warm_up(url, options))
        pairs, tiers_off = [], {}
        for name, workload in workloads.items():
            runs = {}
            for mode in MODES:
                log(f"bench: {name} / {mode}: {workload.num_turns} turns ...", flush=True)
                settings = dict(meta.get("services", {}).get(_pool_of(name), {}).get(mode, {}))
                runs[mode] = asyncio.run(
                    _play_mode(workload, mode, urls[_pool_of(name)][mode], options, settings)
                )
                if database_url:
                    asyncio.run(attach_server_timings(database_url, runs[mode]))
                log(f"bench: {name} / {mode}: done in {runs[mode].wall_s:.1f} s", flush=True)
            pairs.append((runs["cache"], runs["recompute"]))
            log("\n" + format_profile(*pairs[-1]) + "\n", flush=True)
            tiers_off_url = urls[_pool_of(name)].get(TIERS_OFF)
            if name == "pressure" and tiers_off_url:
                log(f"bench: {name} / cache, tiers off: {workload.num_turns} turns ...", flush=True)
                settings = dict(meta["services"]["pressure"][TIERS_OFF])
                off = asyncio.run(_play_mode(workload, "cache", tiers_off_url, options, settings))
                if database_url:
                    asyncio.run(attach_server_timings(database_url, off))
                tiers_off[name] = off
                meta["tiers_compare"] = {"on": history_reuse(runs["cache"]),
                                         "off": history_reuse(off)}  # fmt: skip
                log(format_tiers_compare(runs["cache"], off), flush=True)
    meta["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    json_path = options.out_dir / f"multiturn-{stamp}.json"
    data = {
        "meta": meta,
        "runs": [run.to_json() for pair in pairs for run in pair],
        "tiers_off": {name: run.to_json() for name, run in tiers_off.items()},
    }
    json_path.write_text(json.dumps(data, indent=1))
    plot_path = _plot(pairs, tiers_off, options, meta, stamp)
    return SuiteResult(
        meta=meta, pairs=pairs, json_path=json_path, plot_path=plot_path, tiers_off=tiers_off
    )


TIERS_OFF = "cache-tiers-off"
TIERS_OFF_SETTINGS = {"KVTHREADS_HOST_CACHE_MB": "0", "KVTHREADS_DISK_CACHE_MB": "0"}


def history_reuse(run: RunResult) -> dict:
    """Of the turns after a conversation's first, how many reused their whole history's KV
    (cached >= the previous turn's input + output - 1), and the history tokens recomputed."""
    by_conversation: dict[int, list] = {}
    for record in run.turns:
        by_conversation.setdefault(record.conversation, []).append(record)
    turns = reused = recomputed = 0
    for records in by_conversation.values():
        records.sort(key=lambda r: r.turn)
        for prev, record in zip(records, records[1:], strict=False):
            if not (prev.ok and record.ok):
                continue
            history = prev.input_tokens + prev.output_tokens - 1
            turns += 1
            reused += record.cached_tokens >= history
            recomputed += max(0, history - record.cached_tokens)
    return {
        "turns": turns,
        "reused": reused,
        "reused_fraction": reused / turns if turns else None,
        "history_tokens_recomputed": recomputed,
    }


def _tier_hits_name(tier: str) -> str:
    return 'kvthreads_kv_tier_hits_total{tier="' + tier + '"}'


def format_tiers_compare(on: RunResult, off: RunResult) -> str:
    """The same workload in cache mode with the KV tiers on and off: history reuse, tier hits."""
    compare = {"on": history_reuse(on), "off": history_reuse(off)}
    lines = [f"{on.profile}, KV tiers on vs off (cache mode, same workload):"]
    for name, run in (("on", on), ("off", off)):
        c = compare[name]
        counters = run.settings.get("server_counters", {})
        hits = ", ".join(
            f"{tier} {int(counters.get(_tier_hits_name(tier), 0))}"
            for tier in ("device", "host", "disk")
        )
        fraction = c["reused_fraction"]
        lines.append(
            f"  tiers {name:>3}: {c['reused']}/{c['turns']} later turns reused their history "
            f"({(fraction or 0) * 100:.0f}%), {c['history_tokens_recomputed']} history tokens "
            f"recomputed; turns served by tier: {hits}"
        )
    verdict = "PASS" if (compare["on"]["reused_fraction"] or 0) >= 0.95 else "FAIL"
    lines.append(f"{verdict}  tiers on: >= 95% of later turns reuse their history")
    return "\n".join(lines)


def _pool_of(profile: str) -> str:
    return "pressure" if profile == "pressure" else "resident"


def _service_urls(
    options: SuiteOptions,
    workloads: dict[str, Workload],
    meta: dict,
    stack: ExitStack,
    stamp: str,
    log,
) -> tuple[dict[str, dict[str, str]], str | None]:
    """pool -> mode -> base URL (the running services given, or instances started here), and
    the database URL when the benchmark can read the ledger."""
    pools = sorted({_pool_of(name) for name in workloads})
    if options.urls:
        if not options.api_key:
            raise ValueError("with service URLs, give the API key too (--api-key)")
        meta["services"] = {
            pool: {m: {"url": u} for m, u in options.urls.items()} for pool in pools
        }
        return {pool: dict(options.urls) for pool in pools}, options.database_url

    per_token = model_kv_bytes_per_token(options.model, options.device)
    pool_mb = {}
    resident = [w for name, w in workloads.items() if _pool_of(name) == "resident"]
    if resident:
        tokens = sizing.resident_pool_tokens(resident)
        pool_mb["resident"] = options.kv_cache_mb or sizing.pool_mb(tokens, per_token)
    if "pressure" in workloads:
        tokens = sizing.pressure_pool_tokens(
            workloads["pressure"], options.concurrency_for("pressure"), PRESSURE_POOL_FRACTION
        )
        pool_mb["pressure"] = options.pressure_kv_cache_mb or sizing.pool_mb(tokens, per_token)
        meta["pressure_live_history_tokens"] = sizing.live_tokens(workloads["pressure"])
    meta["kv_bytes_per_token"] = per_token

    database_url = stack.enter_context(service.database(options.database_url))
    options.api_key = service.prepare_database(database_url)
    instances: dict[str, dict[str, service.ServiceInstance]] = {}
    meta["services"] = {}
    for pool in pools:
        instances[pool], meta["services"][pool] = {}, {}
        for mode in MODES:
            settings = {
                "KVTHREADS_MODEL": options.model,
                "KVTHREADS_DEVICE": options.device,
                "KVTHREADS_RESIDENCY": "on" if mode == "cache" else "off",
                "KVTHREADS_KV_CACHE_MB": str(pool_mb[pool]),
                "KVTHREADS_LOG_LEVEL": "warning",
            }
            if options.max_batch_tokens:
                settings["KVTHREADS_MAX_BATCH_TOKENS"] = str(options.max_batch_tokens)
            variants = {mode: settings}
            if mode == "cache" and options.tiers == "off":
                settings.update(TIERS_OFF_SETTINGS)
            if mode == "cache" and options.tiers == "both" and pool == "pressure":
                variants[TIERS_OFF] = {**settings, **TIERS_OFF_SETTINGS}
            for name, values in variants.items():
                # Each instance its own snapshot folder: instances never share KV files.
                values["KVTHREADS_DISK_CACHE_DIR"] = str(
                    (options.out_dir / f"kv-{stamp}-{name}-{pool}").resolve()
                )
                instances[pool][name] = service.ServiceInstance(
                    name=f"{name}-{pool}",
                    settings=values,
                    database_url=database_url,
                    log_path=options.out_dir / f"multiturn-{stamp}-{name}-{pool}.log",
                )
                meta["services"][pool][name] = dict(values)
    everything = [i for by_mode in instances.values() for i in by_mode.values()]
    log(
        f"bench: starting {len(everything)} service instances "
        f"({', '.join(f'{p} pool {mb} MB' for p, mb in pool_mb.items())}) ...",
        flush=True,
    )
    stack.enter_context(service.running(everything))
    urls = {pool: {m: i.url for m, i in by_mode.items()} for pool, by_mode in instances.items()}
    return urls, database_url


def plot_title(meta: dict) -> str:
    machine = meta["machine"]
    return (
        f"kvthreads multi-turn benchmark: {meta['model']} on {meta['device']} "
        f"({machine['cpu']}, {machine['cores']} cores), cache vs recompute"
    )


def _plot(pairs, tiers_off, options: SuiteOptions, meta: dict, stamp: str) -> Path | None:
    from bench.multiturn.plots import plot_runs

    title = plot_title(meta)
    path = options.out_dir / f"multiturn-{stamp}.png"
    plot_runs(pairs, path, title=title, tiers_off=tiers_off)
    if options.plot_copy is not None:
        plot_runs(pairs, options.plot_copy, title=title, dpi=70, tiers_off=tiers_off)
    return path


def load_result(path: Path) -> SuiteResult:
    """A finished run's JSON, back as a SuiteResult (to print its tables or plot it again)."""
    data = json.loads(path.read_text())
    runs = {(r["profile"], r["mode"]): RunResult.from_json(r) for r in data["runs"]}
    profiles = list(dict.fromkeys(profile for profile, _ in runs))
    pairs = [(runs[p, "cache"], runs[p, "recompute"]) for p in profiles]
    tiers_off = {p: RunResult.from_json(r) for p, r in data.get("tiers_off", {}).items()}
    return SuiteResult(
        meta=data["meta"], pairs=pairs, json_path=path, plot_path=None, tiers_off=tiers_off
    )


def criteria_lines(pairs: list[tuple[RunResult, RunResult]]) -> list[str]:
    """The issue's bar: TTFT speedup for turns >= LATE_TURN (chat 5x, long 10x) and exact fresh
    tokens in cache mode, as PASS/FAIL lines."""
    lines = []
    for cache, recompute in pairs:
        c_sum, r_sum = summarize(cache), summarize(recompute)
        target = TARGET_SPEEDUP.get(cache.profile)
        if target is not None:
            measures = (
                ("client TTFT (first SSE delta)", r_sum.late_ttft_p50, c_sum.late_ttft_p50),
                (
                    "engine TTFT (first token)",
                    r_sum.late_engine_ttft_p50,
                    c_sum.late_engine_ttft_p50,
                ),
            )
            for what, slow, fast in measures:
                gain = speedup(slow, fast)
                if math.isnan(gain):
                    continue  # engine timings need the ledger (a database the bench can read)
                lines.append(
                    f"{'PASS' if gain >= target else 'FAIL'}  {cache.profile}: {what} p50 at "
                    f"turns >= {LATE_TURN} is {gain:.1f}x lower with the cache (bar: {target:.0f}x)"
                )
        check = c_sum.fresh_check
        verdict = "PASS" if check.ok else "FAIL"
        lines.append(
            f"{verdict}  {cache.profile}: cache-mode fresh tokens == new tokens on "
            f"{check.matched}/{check.checked} turns"
        )
    return lines


def summary_text(result: SuiteResult) -> str:
    machine = result.meta["machine"]
    head = (
        f"kvthreads multi-turn benchmark: model {result.meta['model']} on {result.meta['device']}"
        f" ({machine['cpu']}, {machine['cores']} cores), seed {result.meta['seed']}, "
        f"scale {result.meta['scale']}, reply scale {result.meta['reply_scale']}"
    )
    return "\n".join([head, "", format_summary(result.pairs), "", *criteria_lines(result.pairs)])
