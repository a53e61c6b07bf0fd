"""A stacked bar chart of cached versus fresh input tokens per day, drawn as SVG on the server.

The page needs no JavaScript and no network: the chart is plain markup. Each day that has turns is
one `<g class="bar-group" data-day=...>` holding its two bars (cached at the bottom, fresh on top),
so a browser test can count the groups and read their numbers back.

    y_max ┤          ┌─┐
          │   ┌─┐    │f│      f: fresh input tokens
          │   │f│    ├─┤      c: cached input tokens
          │   ├─┤    │c│
        0 ┼───┴─┴────┴─┴──
            day1 day2 day3    (every day in range has a slot; empty days draw nothing)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from html import escape

CACHED_COLOUR = "#2e9e6b"
FRESH_COLOUR = "#e07b39"
GRID_COLOUR = "#d9dde3"
TEXT_COLOUR = "#4a5160"

# Space around the plot for the axis labels.
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 72, 16, 28, 36
MIN_LABEL_GAP_PX = 56  # x labels closer than this would overlap


@dataclass(frozen=True)
class DayTokens:
    day: date
    cached_tokens: int
    fresh_tokens: int


def nice_ceiling(value: int) -> tuple[int, int]:
    """The smallest "round" axis maximum >= value and its tick step (1, 2 or 5 x 10^k per tick)."""
    if value <= 0:
        return 1, 1
    raw_step = value / 4
    magnitude = 10 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    step = max(1, int(step))
    return step * math.ceil(value / step), step


def _tokens_label(n: int) -> str:
    for size, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:g}{suffix}"
    return str(n)


def render_day_chart(days: Sequence[DayTokens], *, width: int = 960, height: int = 300) -> str:
    """SVG markup for `days` (one slot each, in order). The caller marks it safe for the template."""
    if not days:
        raise ValueError("the chart needs at least one day")
    plot_w = width - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = height - MARGIN_TOP - MARGIN_BOTTOM
    y_max, y_step = nice_ceiling(max(d.cached_tokens + d.fresh_tokens for d in days))
    slot_w = plot_w / len(days)
    bar_w = max(1.0, slot_w * 0.7)

    def y_of(tokens: int) -> float:
        return MARGIN_TOP + plot_h - plot_h * tokens / y_max

    parts = [
        f'<svg class="day-chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" role="img" aria-label="Cached and fresh input tokens per day" '
        f'font-family="system-ui, sans-serif" font-size="11" fill="{TEXT_COLOUR}">'
    ]
    for tick in range(0, y_max + 1, y_step):
        y = y_of(tick)
        parts.append(
            f'<line x1="{MARGIN_LEFT}" x2="{width - MARGIN_RIGHT}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="{GRID_COLOUR}"/>'
            f'<text x="{MARGIN_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_tokens_label(tick)}</text>'
        )
    label_every = max(1, math.ceil(MIN_LABEL_GAP_PX / slot_w))
    for i, d in enumerate(days):
        x = MARGIN_LEFT + i * slot_w + (slot_w - bar_w) / 2
        if i % label_every == 0:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{height - MARGIN_BOTTOM + 16}" '
                f'text-anchor="middle">{d.day:%m-%d}</text>'
            )
        if d.cached_tokens + d.fresh_tokens == 0:
            continue
        y_fresh_top = y_of(d.cached_tokens + d.fresh_tokens)
        y_cached_top = y_of(d.cached_tokens)
        parts.append(
            f'<g class="bar-group" data-day="{d.day.isoformat()}" '
            f'data-cached="{d.cached_tokens}" data-fresh="{d.fresh_tokens}">'
            f"<title>{escape(d.day.isoformat())}: {d.cached_tokens:,} cached, "
            f"{d.fresh_tokens:,} fresh</title>"
            f'<rect class="bar-cached" x="{x:.1f}" y="{y_cached_top:.1f}" width="{bar_w:.1f}" '
            f'height="{y_of(0) - y_cached_top:.1f}" fill="{CACHED_COLOUR}"/>'
            f'<rect class="bar-fresh" x="{x:.1f}" y="{y_fresh_top:.1f}" width="{bar_w:.1f}" '
            f'height="{y_cached_top - y_fresh_top:.1f}" fill="{FRESH_COLOUR}"/>'
            "</g>"
        )
    legend_x = width - MARGIN_RIGHT - 190
    parts.append(
        f'<rect x="{legend_x}" y="8" width="10" height="10" fill="{CACHED_COLOUR}"/>'
        f'<text x="{legend_x + 14}" y="17">cached input</text>'
        f'<rect x="{legend_x + 100}" y="8" width="10" height="10" fill="{FRESH_COLOUR}"/>'
        f'<text x="{legend_x + 114}" y="17">fresh input</text>'
        "</svg>"
    )
    return "".join(parts)
