"""PNG plots: time to first token against turn index, and cumulative tokens computed, both modes.

One figure, a column per profile: the top row is TTFT (median, with the p90 dashed, log scale),
the bottom row the tokens computed (prefill + decode) summed over turns 1..k. A profile also run
in cache mode with the KV tiers off (pressure, `--tiers both`) gets a third line.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from bench.multiturn.records import RunResult
from bench.multiturn.report import per_turn

TIERS_OFF_LABEL = "cache, tiers off"

COLORS = {"cache": "#1f77b4", "recompute": "#d62728", TIERS_OFF_LABEL: "#2ca02c"}


def plot_runs(
    pairs: list[tuple[RunResult, RunResult]],
    path: Path,
    *,
    title: str = "",
    dpi: int = 80,
    tiers_off: dict[str, RunResult] | None = None,
) -> Path:
    """Write the figure for (cache, recompute) pairs, one column per profile, plus a line for
    each profile's run in `tiers_off` (profile -> cache mode with the KV tiers off); returns
    path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    if not pairs:
        raise ValueError("nothing to plot: no runs")
    columns = len(pairs)
    width = max(3.6 * columns, 5.0)  # inches; one column alone is too narrow for its legends
    fig, axes = plt.subplots(2, columns, figsize=(width, 5.6), squeeze=False)
    for col, pair in enumerate(pairs):
        ttft_ax, tokens_ax = axes[0][col], axes[1][col]
        lines = [(run.mode, run) for run in pair]
        off = (tiers_off or {}).get(pair[0].profile)
        if off is not None:
            lines.append((TIERS_OFF_LABEL, off))
        for label, run in lines:
            stats = per_turn(run)
            turns = sorted(stats)
            color = COLORS.get(label, "gray")
            ttft_ax.plot(
                turns,
                [stats[t].ttft_p50 * 1000 for t in turns],
                "o-",
                color=color,
                markersize=3,
                label=f"{label} p50",
            )
            ttft_ax.plot(
                turns,
                [stats[t].ttft_p90 * 1000 for t in turns],
                "--",
                color=color,
                linewidth=1,
                alpha=0.7,
                label=f"{label} p90",
            )
            cumulative, total = [], 0
            for t in turns:
                total += stats[t].computed
                cumulative.append(total / 1000)
            tokens_ax.plot(turns, cumulative, "o-", color=color, markersize=3, label=label)
        ttft_ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
        ttft_ax.yaxis.set_major_formatter(plain)
        ttft_ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0)))
        ttft_ax.yaxis.set_minor_formatter(plain)
        ttft_ax.tick_params(axis="y", which="minor", labelsize=7)
        ttft_ax.set_title(pair[0].profile)
        ttft_ax.set_xlabel("turn")
        tokens_ax.set_xlabel("turn")
        if col == 0:
            ttft_ax.set_ylabel("time to first token (ms)")
            tokens_ax.set_ylabel("tokens computed, cumulative (k)")
        if col == 0 or off is not None:  # a third line needs its own legend
            ttft_ax.legend(fontsize=7)
            tokens_ax.legend(fontsize=7)
        for ax in (ttft_ax, tokens_ax):
            ax.grid(True, alpha=0.3)
            ax.xaxis.get_major_locator().set_params(integer=True)
    if title:
        fig.suptitle(textwrap.fill(title, width=int(width * 11)), fontsize=9)  # ~11 chars/inch
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
