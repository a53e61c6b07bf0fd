"""OpenAI's stateful API, driven by the official `openai` package against a live server (the
built-in tiny model: the replies are noise, the tokens and the cache are what is checked).

Responses chained with previous_response_id continue one thread, history from the KV; an older
response branches by fork; conversations are threads; Chat Completions reuse a resent history's
KV through the account's shared blocks; each error is the SDK's typed exception. A Responses turn
renders the same prompt tokens and gives the same greedy reply as the native API, and the billing
report counts these turns exactly as their usage said.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import openai
import pytest
from sqlalchemy import func, select

from app.db import models
from app.threads.service import ThreadService
from tests.e2e.fake_engine import FakeEngine, fake_runtime

ENGINE = {"model": "builtin-tiny-random", "device": "cpu", "kv_cache_mb": 4}
MODEL = "builtin-tiny-random"
GREEDY = {"temperature": 0, "max_output_tokens": 6}
INSTRUCTIONS = "You answer briefly and you answer well. " * 2  # full KV blocks
PROMPTS = ["Hello there.", "Tell me more.", "And then?", "Why so?", "Thanks, bye."]


def sdk(http, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(http.base_url).rstrip("/") + "/v1", api_key=key, max_retries=0
    )


@pytest.fixture
async def live(open_live, new_key):
    http = await open_live(**ENGINE)
    key = await new_key()
    http.headers["Authorization"] = f"Bearer {key}"
    return http, sdk(http, key)


def _cached(response) -> int:
    return response.usage.input_tokens_details.cached_tokens


def _report_range() -> str:
    today = datetime.now(UTC).date()
    return f"start={today - timedelta(1)}&end={today + timedelta(1)}"


async def _totals(http) -> dict:
    r = await http.get(f"/v1/billing/report?{_report_range()}")
    assert r.status_code == 200, r.text
    return r.json()["totals"]


async def _thread_of(db_sessions, response_id: str) -> models.StoredResponse:
    async with db_sessions() as session:
        return await session.get(models.StoredResponse, response_id)


async def test_models_list_and_unknown_models(live):
    http, client = live
    models_ = [m.id async for m in client.models.list()]
    assert models_ == [MODEL]
    assert (await client.models.retrieve(MODEL)).id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(model="gpt-9", input="hi")
    assert info.value.code == "model_not_found" and info.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model="gpt-9", messages=[{"role": "user", "content": "hi"}]
        )


async def test_five_chained_responses_continue_one_thread_from_the_kv(live, db_sessions):
    http, client = live
    responses = []
    previous = None
    for prompt in PROMPTS:
        extra = {"instructions": INSTRUCTIONS} if previous is None else {}
        r = await client.responses.create(
            model=MODEL, input=prompt, previous_response_id=previous, **GREEDY, **extra
        )
        assert r.status in ("completed", "incomplete") and r.object == "response"
        assert r.output[0].content[0].type == "output_text"
        responses.append(r)
        previous = r.id
    for before, after in zip(responses, responses[1:], strict=False):
        assert _cached(after) >= before.usage.input_tokens + before.usage.output_tokens - 1
        assert after.usage.total_tokens == after.usage.input_tokens + after.usage.output_tokens
        assert after.usage.output_tokens_details.reasoning_tokens == 0
    rows = [await _thread_of(db_sessions, r.id) for r in responses]
    assert len({row.thread_id for row in rows}) == 1  # one thread, five turns

    # The same messages through the native API: the same log, the same greedy replies.
    native = (await http.post("/v1/threads", json={"system": INSTRUCTIONS})).json()["id"]
    for prompt, r in zip(PROMPTS, responses, strict=True):
        turn = await http.post(
            f"/v1/threads/{native}/messages",
            json={"content": prompt, "temperature": 0, "max_tokens": 6},
        )
        assert turn.json()["message"]["content"] == r.output_text
        assert turn.json()["usage"]["input_tokens"] == r.usage.input_tokens
    logs = [
        (await http.get(f"/v1/threads/{tid}/tokens")).json()["token_ids"]
        for tid in (native, rows[0].thread_id)
    ]
    assert logs[0] == logs[1]

    # Stored: read back, its input items, deleted.
    again = await client.responses.retrieve(responses[2].id)
    assert again.output_text == responses[2].output_text and again.usage == responses[2].usage
    items = [i async for i in client.responses.input_items.list(responses[2].id)]
    assert [(i.role, i.content[0].text) for i in items] == [("user", PROMPTS[2])]
    await client.responses.delete(responses[4].id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(responses[4].id)

    # Billing: the report counts exactly these turns and the native ones, as their usage said.
    totals = await _totals(http)
    native_usage = [  # the native turns' ledger rows: same input, same cache behaviour
        row for row in (await _ledger(db_sessions, native))
    ]
    assert totals["turns"] == 10
    assert totals["cached_tokens"] == sum(_cached(r) for r in responses) + sum(
        u.cached_tokens for u in native_usage
    )
    assert totals["fresh_tokens"] == sum(
        r.usage.input_tokens - _cached(r) for r in responses
    ) + sum(u.fresh_tokens for u in native_usage)


async def _ledger(db_sessions, thread_id: str) -> list[models.UsageRecord]:
    async with db_sessions() as session:
        query = (
            select(models.UsageRecord)
            .where(models.UsageRecord.thread_id == thread_id)
            .order_by(models.UsageRecord.created_at, models.UsageRecord.id)
        )
        return list((await session.execute(query)).scalars())


async def test_streamed_chain_reads_the_sdks_typed_events(live):
    http, client = live
    previous, finals = None, []
    for prompt in PROMPTS[:3]:
        stream = await client.responses.create(
            model=MODEL,
            input=prompt,
            previous_response_id=previous,
            stream=True,
            **GREEDY,
        )
        kinds, deltas, final = [], [], None
        async for event in stream:
            kinds.append(event.type)
            if isinstance(event, openai.types.responses.ResponseTextDeltaEvent):
                deltas.append(event.delta)
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
        assert kinds[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        assert kinds[-4:-1] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
        ]
        assert kinds[-1] in ("response.completed", "response.incomplete")
        assert final is not None and "".join(deltas) == final.output_text
        finals.append(final)
        previous = final.id
    for before, after in zip(finals, finals[1:], strict=False):
        assert _cached(after) >= before.usage.input_tokens + before.usage.output_tokens - 1
    stored = await client.responses.retrieve(finals[-1].id)
    assert stored.output_text == finals[-1].output_text


async def test_a_branch_from_an_older_response_forks_at_it(live, db_sessions):
    http, client = live
    first = await client.responses.create(
        model=MODEL, input=PROMPTS[0], instructions=INSTRUCTIONS, **GREEDY
    )
    second = await client.responses.create(
        model=MODEL, input=PROMPTS[1], previous_response_id=first.id, **GREEDY
    )
    await client.responses.create(
        model=MODEL, input=PROMPTS[2], previous_response_id=second.id, **GREEDY
    )
    # Branch: the same input as `second`, from `first`, which its thread has moved past.
    branch = await client.responses.create(
        model=MODEL, input=PROMPTS[1], previous_response_id=first.id, **GREEDY
    )
    assert branch.output_text == second.output_text
    assert branch.usage.input_tokens == second.usage.input_tokens
    assert _cached(branch) >= first.usage.input_tokens + first.usage.output_tokens - 1
    rows = {r.id: await _thread_of(db_sessions, r.id) for r in (first, second, branch)}
    assert rows[branch.id].thread_id != rows[first.id].thread_id
    assert rows[second.id].thread_id == rows[first.id].thread_id
    # The branch continues where it is; instructions that differ from its system prompt: 400.
    onward = await client.responses.create(
        model=MODEL, input="Go on.", previous_response_id=branch.id, **GREEDY
    )
    assert (await _thread_of(db_sessions, onward.id)).thread_id == rows[branch.id].thread_id
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(
            model=MODEL, input="x", previous_response_id=onward.id, instructions="Be terse."
        )
    assert info.value.param == "instructions"


async def test_store_false_keeps_nothing_but_the_bill(live, db_sessions):
    http, client = live
    async with db_sessions() as session:
        threads_before = await session.scalar(select(func.count()).select_from(models.Thread))
    r = await client.responses.create(model=MODEL, input="Off the record.", store=False, **GREEDY)
    assert r.store is False and r.usage.output_tokens >= 1
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.create(model=MODEL, input="x", previous_response_id=r.id)
    async with db_sessions() as session:
        threads_after = await session.scalar(select(func.count()).select_from(models.Thread))
        orphans = (
            await session.execute(
                select(models.UsageRecord).where(models.UsageRecord.thread_id.is_(None))
            )
        ).scalars()
        billed = [u for u in orphans if u.output_tokens == r.usage.output_tokens]
    assert threads_after == threads_before
    assert billed and billed[0].input_tokens == r.usage.input_tokens
    totals = await _totals(http)
    assert (totals["turns"], totals["output_tokens"]) == (1, r.usage.output_tokens)


async def test_conversations_hold_items_and_responses(live, db_sessions):
    http, client = live
    conv = await client.conversations.create(
        items=[
            {"type": "message", "role": "system", "content": INSTRUCTIONS},
            {"type": "message", "role": "user", "content": "My name is Ada."},
        ],
        metadata={"topic": "names"},
    )
    assert conv.metadata == {"topic": "names"}
    added = await client.conversations.items.create(
        conv.id,
        items=[
            {"type": "message", "role": "assistant", "content": "Hello Ada."},
            {"type": "message", "role": "user", "content": "I like tea."},
        ],
    )
    assert [i.role for i in added.data] == ["assistant", "user"]
    log = (await http.get(f"/v1/threads/{conv.id}/tokens")).json()["token_ids"]
    first = await client.responses.create(
        model=MODEL, input="What is my name?", conversation=conv.id, **GREEDY
    )
    assert first.conversation.id == conv.id
    # The items' KV was computed when they were added (the engine was idle): only the new
    # input is fresh. That prefill was billed then, as its own ledger row.
    assert _cached(first) == len(log)
    prefills = [r for r in await _ledger(db_sessions, conv.id) if r.output_tokens == 0]
    assert len(prefills) == 2  # conversations.create's items, then items.create's
    assert prefills[0].miss_reason == "new_thread" and prefills[1].miss_reason is None
    assert prefills[-1].input_tokens == len(log)
    second = await client.responses.create(
        model=MODEL, input="And what do I like?", conversation=conv.id, **GREEDY
    )
    assert _cached(second) >= first.usage.input_tokens + first.usage.output_tokens - 1
    items = [i async for i in client.conversations.items.list(conv.id, order="asc")]
    assert [i.role for i in items] == [
        "system", "user", "assistant", "user", "user", "assistant", "user", "assistant",
    ]  # fmt: skip
    assert items[-1].content[0].text == second.output_text
    assert items[-1].id == second.output[0].id
    one = await client.conversations.items.retrieve(items[1].id, conversation_id=conv.id)
    assert one.content[0].text == "My name is Ada."

    # Only the newest item can be deleted; a generated reply goes with its prompt.
    with pytest.raises(openai.ConflictError):
        await client.conversations.items.delete(items[1].id, conversation_id=conv.id)
    await client.conversations.items.delete(items[-1].id, conversation_id=conv.id)
    left = [i async for i in client.conversations.items.list(conv.id, order="asc")]
    assert [i.id for i in left] == [i.id for i in items[:-2]]
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(second.id)  # its reply is gone: so is the response

    updated = await client.conversations.update(conv.id, metadata={"topic": "tea"})
    assert updated.metadata == {"topic": "tea"}
    await client.conversations.delete(conv.id)
    with pytest.raises(openai.NotFoundError):
        await client.conversations.retrieve(conv.id)


async def test_chat_completions_reuse_a_resent_history(live, db_sessions):
    http, client = live
    messages = [{"role": "system", "content": INSTRUCTIONS}]
    usages = []
    for k, prompt in enumerate(PROMPTS[:4]):
        messages.append({"role": "user", "content": prompt})
        params = {"model": MODEL, "messages": messages, "max_tokens": 6, "temperature": 0}
        if k % 2 == 0:
            done = await client.chat.completions.create(**params)
            reply, usage = done.choices[0].message.content, done.usage
            assert done.object == "chat.completion"
        else:
            stream = await client.chat.completions.create(
                **params, stream=True, stream_options={"include_usage": True}
            )
            parts, usage = [], None
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                if chunk.usage is not None:
                    usage = chunk.usage
            reply = "".join(parts)
        assert usage is not None and usage.completion_tokens >= 1
        usages.append(usage)
        messages.append({"role": "assistant", "content": reply})
    for usage in usages[1:]:
        assert usage.prompt_tokens_details.cached_tokens > 0
    assert usages[0].prompt_tokens_details.cached_tokens == 0
    totals = await _totals(http)
    assert totals["turns"] == len(usages)
    assert totals["cached_tokens"] == sum(u.prompt_tokens_details.cached_tokens for u in usages)
    assert totals["input_tokens"] == sum(u.prompt_tokens for u in usages)
    assert totals["output_tokens"] == sum(u.completion_tokens for u in usages)
    async with db_sessions() as session:  # the ephemeral threads are gone
        left = await session.scalar(
            select(func.count())
            .select_from(models.Thread)
            .where(models.Thread.metadata_.has_key("kvthreads.ephemeral"))
        )
    assert left == 0


async def test_errors_are_the_sdks_typed_exceptions(open_live, new_key):
    engine = FakeEngine()
    http = await open_live(fake_runtime(engine))
    client = sdk(http, await new_key())
    model = "fake-engine"

    with pytest.raises(openai.AuthenticationError):
        await sdk(http, "sk-wrong").responses.create(model=model, input="hi")
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("resp_nothing")
    with pytest.raises(openai.NotFoundError) as info:
        await client.responses.create(model=model, input="hi", previous_response_id="resp_x")
    assert info.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(
            model=model, input="hi", tools=[{"type": "web_search_preview"}]
        )
    assert info.value.param == "tools" and "tools" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model=model, input="hi", reasoning={"effort": "low"})
    assert info.value.param == "reasoning"
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], n=2
        )
    assert info.value.param == "n"
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(
            model=model, input=[{"role": "user", "content": [{"type": "input_image"}]}]
        )
    assert info.value.param.startswith("input[0].content")

    # A second response chained on a thread whose turn is in flight: 409.
    first = await client.responses.create(model=model, input="hi", max_output_tokens=4)
    engine.gate_at, engine.gate = 1, engine.gate
    engine.gate.clear()
    stream = await client.responses.create(
        model=model, input="again", previous_response_id=first.id, stream=True
    )
    try:
        with pytest.raises(openai.ConflictError) as conflict:
            await client.responses.create(
                model=model, input="meanwhile", previous_response_id=first.id
            )
        assert conflict.value.body["code"] == "thread_busy"
    finally:
        engine.gate.set()
        kinds = [event.type async for event in stream]
    assert kinds[-1] in ("response.completed", "response.incomplete")


async def test_idempotent_retries_replay_and_make_no_threads(open_live, new_key, db_sessions):
    http = await open_live(fake_runtime(FakeEngine()))
    client = sdk(http, await new_key())
    model = "fake-engine"
    first = await client.responses.create(model=model, input="hi", max_output_tokens=4)

    async def threads() -> int:
        async with db_sessions() as session:
            return await session.scalar(select(func.count()).select_from(models.Thread))

    before = await threads()
    calls = {
        "response": lambda: client.responses.with_raw_response.create(
            model=model,
            input="again",
            previous_response_id=first.id,
            extra_headers={"Idempotency-Key": "resp-1"},
        ),
        "branch": lambda: client.responses.with_raw_response.create(
            model=model,
            input="other",
            previous_response_id=first.id,
            extra_headers={"Idempotency-Key": "resp-2"},
        ),
        "chat": lambda: client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"Idempotency-Key": "chat-1"},
        ),
    }
    for name, call in calls.items():
        once, twice = await call(), await call()
        assert "Idempotent-Replayed" not in once.headers, name
        assert twice.headers["Idempotent-Replayed"] == "true", name
        if name == "chat":
            assert twice.parse().choices[0].message == once.parse().choices[0].message
        else:
            assert twice.parse().id == once.parse().id and twice.parse().output_text
    assert await threads() == before + 1  # the branch's fork; no retry made one
    with pytest.raises(openai.UnprocessableEntityError):  # the same key, another request
        await client.responses.create(
            model=model, input="else", extra_headers={"Idempotency-Key": "resp-1"}
        )


async def test_over_the_rate_limit_is_a_rate_limit_error(open_live, new_key):
    http = await open_live(fake_runtime(FakeEngine()), rate_limit_per_minute=2)
    client = sdk(http, await new_key())
    with pytest.raises(openai.RateLimitError) as info:
        for _ in range(3):
            await client.models.list()
    assert info.value.code == "rate_limited"
    assert info.value.response.headers["Retry-After"]


async def test_a_response_that_cannot_run_leaves_no_thread(open_live, new_key, db_sessions):
    http = await open_live(fake_runtime(FakeEngine(), max_context_tokens=64))
    client = sdk(http, await new_key())

    async def threads() -> int:
        async with db_sessions() as session:
            return await session.scalar(select(func.count()).select_from(models.Thread))

    before = await threads()
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="fake-engine", input="hi", max_output_tokens=100)
    assert info.value.param == "max_output_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        await client.responses.create(model="fake-engine", input="hi " * 40)
    assert info.value.code == "context_length_exceeded"
    first = await client.responses.create(model="fake-engine", input="hi", max_output_tokens=4)
    with pytest.raises(openai.BadRequestError):  # a branch that cannot run: no fork is kept
        await client.responses.create(
            model="fake-engine", input="x " * 40, previous_response_id=first.id, store=False
        )
    assert await threads() == before + 1


async def test_a_stream_that_fails_ends_with_error_events(open_live, new_key, db_sessions):
    http = await open_live(fake_runtime(FakeEngine(fail_after_tokens=2)))
    client = sdk(http, await new_key())
    stream = await client.responses.create(model="fake-engine", input="hi", stream=True)
    events = [event async for event in stream]
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2].code == "generation_failed"
    assert events[-1].response.status == "failed"
    with pytest.raises(openai.NotFoundError):  # nothing was stored
        await client.responses.retrieve(events[0].response.id)

    chunks = await client.chat.completions.create(
        model="fake-engine", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError, match="generation failed"):
        async for _ in chunks:
            pass
    async with db_sessions() as session:  # nothing billed, no thread made for them is left
        assert await session.scalar(select(func.count()).select_from(models.UsageRecord)) == 0
        assert await session.scalar(select(func.count()).select_from(models.Thread)) == 0


@pytest.mark.parametrize("route", ["chat", "response"])
async def test_a_stream_ends_once_its_ephemeral_thread_is_gone(
    open_live, new_key, db_sessions, monkeypatch, route
):
    """The last events go out after the turn is closed: a slow delete of the call's ephemeral
    thread is waited for, so a client acting on the end of the stream never finds it."""
    delete = ThreadService.delete

    async def slow_delete(self, *args, **kwargs):
        await asyncio.sleep(0.3)
        return await delete(self, *args, **kwargs)

    monkeypatch.setattr(ThreadService, "delete", slow_delete)
    http = await open_live(fake_runtime(FakeEngine()))
    client = sdk(http, await new_key())

    async def threads() -> int:
        async with db_sessions() as session:
            return await session.scalar(select(func.count()).select_from(models.Thread))

    before = await threads()
    if route == "chat":
        stream = await client.chat.completions.create(
            model="fake-engine", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    else:
        stream = await client.responses.create(
            model="fake-engine", input="hi", stream=True, store=False
        )
    async for _ in stream:
        pass
    assert await threads() == before
