import pytest

from app.config import ConfigError, load_settings
from app.engine.runtime.turn_metrics import Histogram, TurnMetrics


def test_histogram_buckets_are_cumulative_with_inf_last():
    h = Histogram((1.0, 2.0))
    for value in (0.5, 1.0, 1.5, 3.0):
        h.observe(value)
    snap = h.snapshot()
    assert (snap.counts, snap.sum, snap.count) == ((2, 3, 4), 6.0, 4)


def test_turn_metrics_time_per_output_token_is_decode_time_over_the_later_tokens():
    m = TurnMetrics()
    m.observe(
        {"queue_s": 0.01, "ttft_s": 0.1, "total_s": 0.5}, prompt_tokens=40, generated_tokens=5
    )
    m.observe({"queue_s": 0.0, "ttft_s": 0.2, "total_s": 0.2}, prompt_tokens=8, generated_tokens=1)
    snap = m.snapshot()
    assert snap["tpot_seconds"].count == 1 and snap["tpot_seconds"].sum == pytest.approx(0.1)
    assert (snap["ttft_seconds"].count, snap["turn_seconds"].count) == (2, 2)
    assert (snap["input_tokens"].sum, snap["output_tokens"].sum) == (48, 6)


def test_metrics_token_setting():
    assert load_settings({}).metrics_token is None
    token = "t" * 16
    assert load_settings({"KVTHREADS_METRICS_TOKEN": token}).metrics_token == token
    with pytest.raises(ConfigError):
        load_settings({"KVTHREADS_METRICS_TOKEN": "short"})
