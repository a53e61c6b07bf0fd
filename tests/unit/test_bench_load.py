"""bench/load.py's bookkeeping, on a mock transport: bounded requests, 429s retried, usage kept."""

from __future__ import annotations

import random

import httpx

from bench.load import Stats, _conversation, _percentile

USAGE = {"input_tokens": 5, "cached_tokens": 0, "fresh_tokens": 5, "output_tokens": 2}


def _service():
    answers = iter([429, 200, 200, 200, 200])

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/threads":
            return httpx.Response(201, json={"id": "thr_1"})
        status = next(answers)
        if status == 429:
            error = {"type": "too_many_turns_in_flight", "message": "wait"}
            return httpx.Response(429, json={"error": error}, headers={"Retry-After": "0"})
        return httpx.Response(200, json={"usage": USAGE})

    return httpx.MockTransport(handle)


async def test_a_conversation_retries_429_and_keeps_each_turns_usage():
    stats = Stats(max_requests=100)
    async with httpx.AsyncClient(transport=_service(), base_url="http://127.0.0.1") as client:
        thread = await _conversation(client, "kvt_x", 3, stats, random.Random(0))
    assert thread == "thr_1"
    assert stats.sent == 5 and stats.statuses == {201: 1, 429: 1, 200: 3}
    assert stats.errors == {"too_many_turns_in_flight": 1}
    assert stats.usage["thr_1"] == [USAGE] * 3 and len(stats.turn_ms) == 3


async def test_the_request_budget_stops_a_conversation():
    stats = Stats(max_requests=2)
    async with httpx.AsyncClient(transport=_service(), base_url="http://127.0.0.1") as client:
        await _conversation(client, "kvt_x", 10, stats, random.Random(0))
    assert stats.sent == 2


def test_percentiles():
    values = [float(v) for v in range(1, 101)]
    assert (_percentile(values, 0.5), _percentile(values, 0.99)) == (51.0, 99.0)
    assert _percentile([], 0.5) != _percentile([], 0.5)  # nan
