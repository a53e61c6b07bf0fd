"""The HTTP side of the benchmark: a `TurnSender` that drives the service's public API.

Each turn is `POST /v1/threads/{id}/messages` with `stream: true`. Time to first token is taken
client-side, from just before the request is sent to the first token event of the server-sent
event stream; the last event carries the usage and cache state of the turn.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx

from bench.multiturn.records import TurnRecord
from bench.multiturn.workloads import Conversation, user_text


@dataclass(frozen=True)
class ServerSentEvent:
    event: str  # "message" when the server names none
    data: str


async def iter_sse(lines: AsyncIterator[str]) -> AsyncIterator[ServerSentEvent]:
    """Parse a text/event-stream (the WHATWG rules the service needs: event, data, comments)."""
    event, data = "", []
    async for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                yield ServerSentEvent(event or "message", "\n".join(data))
            event, data = "", []
            continue
        if line.startswith(":"):
            continue  # a comment (keep-alive)
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
    if data:
        yield ServerSentEvent(event or "message", "\n".join(data))


# The service releases a turn's lock just after it sends the `done` event, so the next turn of
# the same thread, sent at once, may find it busy (409) for a few milliseconds.
MAX_BUSY_RETRIES = 100
BUSY_RETRY_S = 0.005


class ServiceError(RuntimeError):
    """The service answered a turn with an error status or an error event."""


def _error_text(status: int, body: bytes | str) -> str:
    try:
        payload = json.loads(body)
        error = payload.get("error", payload)
        return f"HTTP {status} {error.get('type', '')}: {error.get('message', payload)}"
    except (ValueError, AttributeError):
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return f"HTTP {status}: {text[:200]}"


class HttpSender:
    """Plays turns over HTTP. One sender per service instance (mode); the client keeps connections
    alive so that connection setup does not land in the time to first token."""

    def __init__(
        self, client: httpx.AsyncClient, *, temperature: float = 1.0, top_k: int = 0
    ) -> None:
        self.client = client
        self.temperature = temperature
        self.top_k = top_k

    async def create_thread(self, conversation: Conversation) -> str:
        response = await self.client.post(
            "/v1/threads", json={"metadata": {"bench": f"conversation-{conversation.index}"}}
        )
        if response.status_code != 201:
            raise ServiceError(_error_text(response.status_code, response.content))
        return response.json()["id"]

    async def token_log(self, thread_id: str) -> list[int]:
        response = await self.client.get(f"/v1/threads/{thread_id}/tokens")
        if response.status_code != 200:
            raise ServiceError(_error_text(response.status_code, response.content))
        return response.json()["token_ids"]

    async def send_turn(self, thread_id: str, conversation: Conversation, turn: int) -> TurnRecord:
        spec = conversation.turns[turn - 1]
        record = TurnRecord.for_turn(conversation, turn, thread_id)
        body = {
            "content": user_text(conversation, turn),
            "max_tokens": spec.max_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "seed": conversation.sampling_seed(turn),
            "stream": True,
        }
        while True:
            sent = time.perf_counter()
            async with self.client.stream(
                "POST", f"/v1/threads/{thread_id}/messages", json=body
            ) as response:
                if response.status_code == 409 and record.busy_retries < MAX_BUSY_RETRIES:
                    await response.aread()
                    record.busy_retries += 1
                    await asyncio.sleep(BUSY_RETRY_S)
                    continue
                if response.status_code != 200:
                    record.error = _error_text(response.status_code, await response.aread())
                    return record
                async for event in iter_sse(response.aiter_lines()):
                    self._take(record, event, sent)
            break
        record.total_s = time.perf_counter() - sent
        if record.error is None and record.finish_reason is None:
            record.error = "the stream ended without its final (usage) event"
        return record

    @staticmethod
    def _take(record: TurnRecord, event: ServerSentEvent, sent: float) -> None:
        """Fold one stream event into the record."""
        if event.data.strip() == "[DONE]":
            return
        payload = json.loads(event.data)
        if event.event == "error" or "error" in payload:
            error = payload.get("error", payload)
            record.error = f"{error.get('type', 'error')}: {error.get('message', error)}"
            return
        if "usage" in payload:  # the last event: the whole turn result
            usage, cache = payload["usage"], payload.get("cache", {})
            record.input_tokens = usage["input_tokens"]
            record.cached_tokens = usage["cached_tokens"]
            record.fresh_tokens = usage["fresh_tokens"]
            record.output_tokens = usage["output_tokens"]
            record.cost = usage.get("cost")
            record.cache_hit = cache.get("hit")
            record.miss_reason = cache.get("miss_reason")
            message = payload.get("message", {})
            record.finish_reason = message.get("finish_reason", payload.get("finish_reason"))
            record.server = payload.get("timings", {}) or {}
            return
        seen = time.perf_counter() - sent
        record.token_times_s.append(seen)
        if record.ttft_s is None:  # the first token event, whatever text it completes
            record.ttft_s = seen
