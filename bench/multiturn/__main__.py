"""`python -m bench.multiturn`: the multi-turn benchmark, `cache` against `recompute`.

By default it starts everything itself (a throwaway PostgreSQL, a key, two service instances per
KV pool size) and stops it all at the end. Point it at running services with --url-cache and
--url-recompute (and --api-key) instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.multiturn.plots import plot_runs
from bench.multiturn.records import MODES
from bench.multiturn.report import format_profile
from bench.multiturn.suite import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MODEL,
    DEFAULT_REPLY_SCALE,
    SuiteOptions,
    format_tiers_compare,
    load_result,
    plot_title,
    run_suite,
    summary_text,
)
from bench.multiturn.workloads import PROFILES


def _profiles(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROFILES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown profile(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(PROFILES)}"
        )
    return names


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = ", ".join(f"{k} {v}" for k, v in DEFAULT_CONCURRENCY.items())
    parser = argparse.ArgumentParser(
        prog="python -m bench.multiturn",
        description="Many concurrent multi-turn conversations over HTTP, with the KV cache "
        "resident between turns (cache) and without it (recompute), side by side.",
    )
    parser.add_argument(
        "--profiles",
        type=_profiles,
        default=list(PROFILES),
        help=f"comma-separated, from {', '.join(PROFILES)} (default: all)",
    )
    parser.add_argument(
        "--sizes",
        choices=("cpu", "full"),
        default="cpu",
        help="cpu: fewer conversations and shorter `long` documents, to fit "
        "ten minutes on two cores (default); full: the issue's sizes",
    )
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    parser.add_argument(
        "--scale",
        type=_positive_float,
        default=1.0,
        help="multiply the number of conversations (default 1)",
    )
    parser.add_argument(
        "--reply-scale",
        type=_positive_float,
        default=DEFAULT_REPLY_SCALE,
        help=f"multiply every profile's reply lengths (default {DEFAULT_REPLY_SCALE})",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=None,
        help=f"conversations in flight, every profile (default: {defaults})",
    )
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"KVTHREADS_MODEL of the started services (default {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda", "auto"),
        help="KVTHREADS_DEVICE of the started services (default cpu)",
    )
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--max-batch-tokens",
        type=_positive_int,
        default=None,
        help="KVTHREADS_MAX_BATCH_TOKENS of the started services",
    )
    parser.add_argument(
        "--kv-cache-mb",
        type=_positive_int,
        default=None,
        help="pool of the chat/long/agent instances (default: holds them all)",
    )
    parser.add_argument(
        "--pressure-kv-cache-mb",
        type=_positive_int,
        default=None,
        help="pool of the pressure instances (default: half the live history)",
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="use this PostgreSQL (default: a throwaway local cluster)",
    )
    parser.add_argument("--url-cache", default=None, help="a running service with residency on")
    parser.add_argument(
        "--url-recompute", default=None, help="a running service with KVTHREADS_RESIDENCY=off"
    )
    parser.add_argument("--api-key", default=None, help="key for --url-* services")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("bench/out"),
        help="folder for the JSON, PNG and service logs (default bench/out)",
    )
    parser.add_argument(
        "--plot-copy",
        type=Path,
        default=None,
        help="also write a small copy of the plot here (e.g. docs/...png)",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        default=None,
        help="run nothing: print the tables of a finished run's JSON (and --plot-copy its plot)",
    )
    parser.add_argument(
        "--no-warmup", action="store_true", help="skip the unmeasured warm-up turns"
    )
    parser.add_argument(
        "--tiers",
        choices=("on", "off", "both"),
        default="both",
        help="the KV tiers (host memory, disk) of the cache instances: on (default budgets), "
        "off (KVTHREADS_HOST_CACHE_MB=0, KVTHREADS_DISK_CACHE_MB=0), or both: pressure also "
        "runs on a cache instance with them off, side by side (default both)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    urls = {"cache": args.url_cache, "recompute": args.url_recompute}
    if any(urls.values()) and not all(urls.values()):
        print("bench: give both --url-cache and --url-recompute, or neither", file=sys.stderr)
        return 2
    options = SuiteOptions(
        profiles=args.profiles,
        full_sizes=args.sizes == "full",
        seed=args.seed,
        scale=args.scale,
        reply_scale=args.reply_scale,
        concurrency=args.concurrency,
        model=args.model,
        device=args.device,
        temperature=args.temperature,
        max_batch_tokens=args.max_batch_tokens,
        kv_cache_mb=args.kv_cache_mb,
        pressure_kv_cache_mb=args.pressure_kv_cache_mb,
        database_url=args.database_url,
        urls={m: urls[m] for m in MODES} if all(urls.values()) else None,
        api_key=args.api_key,
        out_dir=args.out,
        plot_copy=args.plot_copy,
        warmup=not args.no_warmup,
        tiers=args.tiers,
    )
    if args.from_json is not None:
        return _report_only(args.from_json, args.plot_copy)
    try:
        result = run_suite(options)
    except (ValueError, RuntimeError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    print(summary_text(result))
    print(f"\nturns: {result.json_path}\nplot:  {result.plot_path}")
    if not result.ok:
        print("bench: some turns failed or fresh tokens did not match (see above)", file=sys.stderr)
        return 1
    return 0


def _report_only(path: Path, plot_copy: Path | None) -> int:
    result = load_result(path)
    for pair in result.pairs:
        print(format_profile(*pair) + "\n")
        off = result.tiers_off.get(pair[0].profile)
        if off is not None:
            print(format_tiers_compare(pair[0], off) + "\n")
    print(summary_text(result))
    if plot_copy is not None:
        title = plot_title(result.meta)
        plot_runs(result.pairs, plot_copy, title=title, dpi=70, tiers_off=result.tiers_off)
        print(f"\nplot: {plot_copy}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
