"""The async bridge: streams, settling turns, cancellation, errors, shutdown, idling."""

from __future__ import annotations

import asyncio

import pytest
from engine_testing import random_ids, random_model, run_to_finish

from app.engine.runtime.async_engine import (
    AsyncLLMEngine,
    EngineClosed,
    NoFinishedTurn,
    ThreadInFlight,
)
from app.engine.runtime.llm_engine import LLMEngine
from app.engine.runtime.types import FinishEvent, MissReason, SamplingParams, TokenEvent

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def decode(ids):
    return "".join(LETTERS[i % 26] for i in ids)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return random_model(seed=4)


@pytest.fixture
def make_bridge(model):
    started: list[AsyncLLMEngine] = []

    def make(**kwargs) -> AsyncLLMEngine:
        kwargs.setdefault("num_blocks", 64)
        kwargs.setdefault("block_size", 4)
        engine = LLMEngine(model, check_invariants=True, decode=decode, **kwargs)
        bridge = AsyncLLMEngine(engine)
        bridge.start()
        started.append(bridge)
        return bridge

    yield make
    for bridge in started:
        bridge.shutdown()


async def eventually(predicate, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def collect(stream) -> tuple[list[TokenEvent], FinishEvent]:
    tokens, finish = [], None
    async for event in stream:
        if isinstance(event, FinishEvent):
            finish = event
        else:
            tokens.append(event)
    return tokens, finish


def reference_tokens(model, prompt, params) -> list[int]:
    engine = LLMEngine(model, num_blocks=64, block_size=4, residency=False)
    engine.add_request("ref", [], prompt, params, first_turn=True)
    (event,) = run_to_finish(engine).values()
    return event.token_ids


async def test_turns_stream_tokens_then_settle(make_bridge, model):
    bridge = make_bridge()
    prompt = random_ids(10, seed=1)
    tokens, finish = await collect(bridge.generate("t", [], prompt, greedy(6), first_turn=True))
    assert [t.token_id for t in tokens] == finish.token_ids
    assert "".join(t.text for t in tokens) == finish.text == decode(finish.token_ids)
    assert finish.token_ids == reference_tokens(model, prompt, greedy(6))
    assert finish.counts.miss_reason is MissReason.NEW_THREAD
    assert set(finish.timings) == {"queue_s", "ttft_s", "total_s"}
    with pytest.raises(ThreadInFlight):  # not settled yet
        bridge.generate("t", prompt, [1], greedy(1), first_turn=False)
    bridge.commit_turn("t")
    with pytest.raises(NoFinishedTurn):
        bridge.commit_turn("t")

    history = prompt + finish.token_ids
    _, second = await collect(bridge.generate("t", history, [3, 4], greedy(4), first_turn=False))
    assert (second.counts.cached_tokens, second.counts.miss_reason) == (15, None)
    assert second.token_ids == reference_tokens(model, history + [3, 4], greedy(4))
    assert bridge.rollback_turn("t")
    assert bridge.rollback_turn("t") is False
    await eventually(lambda: not bridge.thread_state("t").pinned)
    assert bridge.thread_state("t").cached_tokens == len(history)
    stats = bridge.stats()
    assert (stats.hits, stats.misses["new_thread"]) == (0, 1)  # counted at commit: none rolled back


async def test_closing_a_stream_early_aborts_frees_and_rolls_back(make_bridge):
    bridge = make_bridge()
    prompt = random_ids(12, seed=2)
    _, first = await collect(bridge.generate("t", [], prompt, greedy(3), first_turn=True))
    bridge.commit_turn("t")
    committed = bridge.thread_state("t")
    history = prompt + first.token_ids

    stream = bridge.generate("t", history, [5, 6, 7], greedy(40), first_turn=False)
    event = await stream.__anext__()
    assert isinstance(event, TokenEvent)
    await stream.aclose()
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()
    # Not busy any more at once; the engine thread rolls back right after.
    await eventually(lambda: not bridge.thread_state("t").pinned)
    state = bridge.thread_state("t")
    assert state.cached_tokens == len(history)  # the history, now computed; nothing new
    assert state.num_blocks == -(-len(history) // 4)
    assert bridge.stats().num_used_blocks == state.num_blocks
    assert committed.cached_tokens == len(history) - 1
    with bridge.engine.lock:
        bridge.engine.kv.check_integrity()


async def test_a_cancelled_consumer_aborts_the_turn(make_bridge):
    bridge = make_bridge()
    stream = bridge.generate("t", [], random_ids(9, seed=3), greedy(200), first_turn=True)
    got_one = asyncio.Event()

    async def consume():
        async for _ in stream:
            got_one.set()

    task = asyncio.create_task(consume())
    await got_one.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: bridge.stats().num_pinned_threads == 0)
    assert bridge.stats().num_used_blocks == 0  # a first turn rolls back to nothing
    # The thread is free again.
    _, finish = await collect(bridge.generate("t", [], [1, 2, 3], greedy(2), first_turn=True))
    assert finish.finish_reason == "length"


async def test_closing_after_the_finish_event_keeps_the_turn_for_the_caller(make_bridge):
    bridge = make_bridge()
    stream = bridge.generate("t", [], random_ids(7, seed=4), greedy(3), first_turn=True)
    async for event in stream:
        if isinstance(event, FinishEvent):
            break
    await stream.aclose()  # what `async for` + break + cleanup does
    bridge.commit_turn("t")
    await eventually(lambda: not bridge.thread_state("t").pinned)
    assert bridge.thread_state("t").cached_tokens == 7 + 3 - 1


async def test_an_error_in_a_step_fails_the_stream_and_the_engine_goes_on(make_bridge, model):
    failing = {"armed": True}

    def hook(seqs, logits):
        if failing["armed"]:
            failing["armed"] = False
            raise RuntimeError("device fell over")

    bridge = make_bridge(on_logits=hook)
    stream = bridge.generate("t", [], random_ids(8, seed=5), greedy(4), first_turn=True)
    with pytest.raises(RuntimeError, match="device fell over"):
        await collect(stream)
    await eventually(lambda: bridge.stats().num_pinned_threads == 0)
    prompt = random_ids(8, seed=5)
    _, finish = await collect(bridge.generate("t", [], prompt, greedy(4), first_turn=True))
    assert finish.token_ids == reference_tokens(model, prompt, greedy(4))


async def test_requests_that_cannot_run_are_refused_at_once(make_bridge):
    bridge = make_bridge(num_blocks=4)
    with pytest.raises(ValueError, match="KV pool"):
        bridge.generate("t", [], random_ids(30, seed=6), greedy(1), first_turn=True)
    with pytest.raises(ValueError, match="top_k"):
        bridge.generate("t", [], [1], SamplingParams(top_k=-2), first_turn=True)
    _, finish = await collect(bridge.generate("t", [], [1, 2], greedy(2), first_turn=True))
    assert len(finish.token_ids) == 2


async def test_concurrent_turns_batch_and_match_their_solo_runs(make_bridge, model):
    bridge = make_bridge(max_batch_tokens=16, max_num_seqs=4)
    prompts = {f"t{i}": random_ids(5 + 7 * i, seed=20 + i) for i in range(5)}
    results = await asyncio.gather(
        *(
            collect(bridge.generate(k, [], p, greedy(8), first_turn=True))
            for k, p in prompts.items()
        )
    )
    for (key, prompt), (_, finish) in zip(prompts.items(), results, strict=True):
        assert finish.token_ids == reference_tokens(model, prompt, greedy(8)), key
        bridge.commit_turn(key)
    await eventually(lambda: bridge.stats().num_pinned_threads == 0)
    assert bridge.stats().num_resident_threads == 5


async def test_a_full_pool_waits_for_a_commit_without_spinning(make_bridge):
    bridge = make_bridge(num_blocks=8)  # 32 tokens
    _, first = await collect(
        bridge.generate("a", [], random_ids(18, seed=7), greedy(3), first_turn=True)
    )
    # a holds 5 blocks, pinned until committed; b needs 5 of the 3 left: it must wait.
    steps = {"n": 0}
    step = bridge.engine.step

    def counting_step():
        steps["n"] += 1
        return step()

    bridge.engine.step = counting_step
    stream = bridge.generate("b", [], random_ids(18, seed=8), greedy(3), first_turn=True)
    task = asyncio.create_task(collect(stream))
    await asyncio.sleep(0.3)
    assert not task.done()
    idle_steps = steps["n"]
    await asyncio.sleep(0.3)
    assert steps["n"] == idle_steps  # asleep on its condition, not polling
    bridge.commit_turn("a")  # a becomes evictable: b runs
    _, finish = await task
    assert finish.finish_reason == "length"
    assert bridge.stats().evictions == 1


async def test_forget_thread(make_bridge):
    bridge = make_bridge()
    stream = bridge.generate("t", [], [1, 2, 3, 4, 5], greedy(2), first_turn=True)
    with pytest.raises(ThreadInFlight):
        bridge.forget_thread("t")
    await collect(stream)
    bridge.commit_turn("t")
    bridge.forget_thread("t")
    await eventually(lambda: bridge.stats().num_used_blocks == 0)
    _, finish = await collect(bridge.generate("t", [1, 2], [3], greedy(1), first_turn=False))
    assert finish.counts.miss_reason is MissReason.RESTARTED


async def test_shutdown_aborts_turns_in_flight(make_bridge):
    bridge = make_bridge()
    _, done = await collect(bridge.generate("done", [], [1, 2, 3], greedy(2), first_turn=True))
    stream = bridge.generate("t", [], random_ids(9, seed=9), greedy(500), first_turn=True)
    assert isinstance(await stream.__anext__(), TokenEvent)
    await asyncio.to_thread(bridge.shutdown)
    with pytest.raises(EngineClosed):
        async for _ in stream:
            pass
    assert bridge.stats().num_used_blocks == 0  # both rolled back (first turns: to nothing)
    assert bridge.stats().num_pinned_threads == 0
    bridge.commit_turn("done")  # settling after shutdown is harmless
    with pytest.raises(EngineClosed):
        bridge.generate("u", [], [1], greedy(1), first_turn=True)


async def test_a_chat_with_the_builtin_model_through_the_loader():
    """The loader's model, tokenizer, chat format and stop ids, wired by from_loaded."""
    from app.engine.loading.loader import resolve_model

    loaded = resolve_model("builtin-tiny-random", device="cpu")
    bridge = AsyncLLMEngine.from_loaded(loaded, kv_cache_mb=4, block_size=16)
    bridge.start()
    try:
        chat = loaded.chat_format
        history: list[int] = []
        new = chat.start("Be brief.") + chat.user_turn("Hello there")
        params = SamplingParams(max_tokens=12, temperature=0.7, seed=3)
        expected_cached = None
        for turn in range(3):
            tokens, finish = await collect(
                bridge.generate("chat", history, new, params, first_turn=turn == 0)
            )
            bridge.commit_turn("chat")
            assert finish.text == "".join(t.text for t in tokens)
            if finish.finish_reason == "stop":
                assert finish.token_ids[-1] in loaded.stop_token_ids
            else:
                assert len(finish.token_ids) == 12
            assert finish.text == loaded.tokenizer.decode(
                [i for i in finish.token_ids if i not in loaded.stop_token_ids]
            )
            if expected_cached is not None:
                assert finish.counts.cached_tokens == expected_cached
                assert finish.counts.miss_reason is None
            prompt = history + new
            history = (
                prompt
                + finish.token_ids
                + chat.assistant_end(finish.token_ids, finish.finish_reason)
            )
            expected_cached = len(prompt) + len(finish.token_ids) - 1
            new = chat.user_turn(f"And turn {turn + 2}?")
    finally:
        bridge.shutdown()
