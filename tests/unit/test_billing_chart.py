"""The server-drawn SVG chart: one bar group per day with tokens, bars stacked to scale."""

import re
from datetime import date, timedelta
from xml.etree import ElementTree

import pytest

from app.billing.chart import DayTokens, nice_ceiling, render_day_chart

SVG = "{http://www.w3.org/2000/svg}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, (1, 1)), (1, (1, 1)), (7, (8, 2)), (10, (10, 5)), (999, (1000, 500)), (1234, (1500, 500))],
)
def test_nice_ceiling(value, expected):
    assert nice_ceiling(value) == expected


def test_one_group_per_day_with_tokens_stacked_to_scale():
    start = date(2026, 11, 1)
    days = [DayTokens(start + timedelta(i), cached, fresh) for i, (cached, fresh) in
            enumerate([(300, 100), (0, 0), (0, 50), (1000, 0)])]  # fmt: skip
    svg = render_day_chart(days, width=600, height=300)
    root = ElementTree.fromstring(svg)  # well-formed XML
    groups = root.findall(f"{SVG}g[@class='bar-group']")
    assert [g.get("data-day") for g in groups] == ["2026-11-01", "2026-11-03", "2026-11-04"]
    heights = {}
    for g in groups:
        cached, fresh = (g.find(f"{SVG}rect[@class='bar-{k}']") for k in ("cached", "fresh"))
        heights[g.get("data-day")] = (float(cached.get("height")), float(fresh.get("height")))
        # fresh sits right on top of cached
        assert float(fresh.get("y")) + float(fresh.get("height")) == pytest.approx(
            float(cached.get("y")), abs=0.11
        )
    unit = heights["2026-11-04"][0] / 1000  # pixels per token
    assert heights["2026-11-01"] == pytest.approx((300 * unit, 100 * unit), abs=0.11)
    assert heights["2026-11-03"] == pytest.approx((0, 50 * unit), abs=0.11)
    assert re.search(r">2026-11-03: 0 cached, 50 fresh<", svg)


def test_an_empty_range_draws_axes_and_no_bars():
    svg = render_day_chart([DayTokens(date(2026, 1, 1), 0, 0)])
    assert "bar-group" not in svg and "<line" in svg
    with pytest.raises(ValueError):
        render_day_chart([])
