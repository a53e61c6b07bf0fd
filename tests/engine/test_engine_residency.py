"""Turns on resident KV: exact counts, eviction, pinning, preemption, rollback, accounting."""

from __future__ import annotations

import pytest
import torch
from engine_testing import LogitsLog, random_ids, random_model, run_to_finish

from app.engine.network.model import CausalLM
from app.engine.runtime.llm_engine import LLMEngine, NoFinishedTurn
from app.engine.runtime.types import FinishEvent, MissReason, SamplingParams
from app.kvcache import ThreadInFlight

ATOL = 1e-4


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model() -> CausalLM:
    return random_model(seed=2)


def make_engine(model, **kwargs) -> LLMEngine:
    kwargs.setdefault("num_blocks", 128)
    kwargs.setdefault("block_size", 4)
    return LLMEngine(model, check_invariants=True, **kwargs)


def one_turn(engine, key, history, new, params, *, first_turn=False) -> FinishEvent:
    engine.add_request(key, history, new, params, first_turn=first_turn)
    (event,) = run_to_finish(engine).values()
    return event


def reference_turn(model, prompt, params) -> tuple[FinishEvent, list[torch.Tensor]]:
    """The same prompt computed from scratch (residency off)."""
    log = LogitsLog()
    engine = make_engine(model, residency=False, on_logits=log)
    seq_id = engine.add_request("ref", [], prompt, params, first_turn=True)
    (event,) = run_to_finish(engine).values()
    return event, log.rows[seq_id]


def test_three_turns_compute_only_their_new_tokens_and_equal_a_recomputation(model):
    log = LogitsLog()
    engine = make_engine(model, on_logits=log)
    user = [random_ids(13, seed=1), random_ids(7, seed=2), random_ids(4, seed=3)]
    history: list[int] = []
    expected = [(13, 0, 13, MissReason.NEW_THREAD), (25, 17, 8, None), (34, 29, 5, None)]
    for turn, (new, (prompt_len, cached, computed, reason)) in enumerate(
        zip(user, expected, strict=True)
    ):
        seq_id = engine.add_request("t", history, new, greedy(5), first_turn=turn == 0)
        (event,) = run_to_finish(engine).values()
        engine.commit_turn("t")
        counts = event.counts
        assert (counts.prompt_tokens, counts.cached_tokens, counts.computed_tokens) == (
            prompt_len,
            cached,
            computed,
        )
        assert (counts.generated_tokens, counts.miss_reason) == (5, reason)
        prompt = history + new
        want, want_rows = reference_turn(model, prompt, greedy(5))
        assert event.token_ids == want.token_ids
        for got, exp in zip(log.rows[seq_id], want_rows, strict=True):
            torch.testing.assert_close(got, exp, atol=ATOL, rtol=0)
        history = prompt + event.token_ids
        assert engine.thread_state("t").cached_tokens == len(history) - 1

    stats = engine.stats()
    assert (stats.hits, stats.misses["new_thread"]) == (2, 1)
    assert stats.cached_tokens == 17 + 29
    assert stats.computed_tokens == (13 + 4) + (8 + 4) + (5 + 4)  # prefill + decode tokens


def test_lru_threads_are_evicted_pinned_ones_never_and_evicted_ones_recompute(model):
    # 12 blocks of 4: room for three threads of 16 cached tokens.
    engine = make_engine(model, num_blocks=12)
    prompts = {key: random_ids(14, seed=10 + i) for i, key in enumerate("abcde")}
    histories = {}
    for key in "abc":
        event = one_turn(engine, key, [], prompts[key], greedy(3), first_turn=True)
        engine.commit_turn(key)
        histories[key] = prompts[key] + event.token_ids
    assert engine.kv.lru_order() == ["a", "b", "c"]
    assert engine.stats().num_free_blocks == 0

    one_turn(engine, "d", [], prompts["d"], greedy(3), first_turn=True)  # evicts a
    engine.commit_turn("d")
    assert engine.kv.lru_order() == ["b", "c", "d"]
    assert not engine.thread_state("a").resident

    # b's second turn needs 2 more blocks; b is pinned (in flight), so c goes, not b.
    event_b = one_turn(engine, "b", histories["b"], [5, 6, 7], greedy(3))
    assert event_b.counts.miss_reason is None and event_b.counts.cached_tokens == 16
    assert engine.kv.lru_order() == ["d"]
    assert not engine.thread_state("c").resident
    # b is finished but not committed: still pinned. e needs 6 blocks: d goes, b stays.
    event_e = one_turn(engine, "e", [], prompts["e"] + [1] * 8, greedy(3), first_turn=True)
    assert event_e.finish_reason == "length"
    state_b = engine.thread_state("b")
    assert state_b.pinned and state_b.cached_tokens == 22
    assert not engine.thread_state("d").resident
    engine.commit_turn("b")
    engine.commit_turn("e")
    assert engine.stats().evictions == 3

    # a comes back: its KV was evicted, it recomputes and says so, with the right tokens.
    event_a = one_turn(engine, "a", histories["a"], [8, 9], greedy(4))
    assert event_a.counts.miss_reason is MissReason.EVICTED
    assert event_a.counts.cached_tokens == 0
    want, _ = reference_turn(model, histories["a"] + [8, 9], greedy(4))
    assert event_a.token_ids == want.token_ids
    engine.commit_turn("a")


def test_preemption_under_pressure_gives_the_same_greedy_tokens(model):
    prompts = {key: random_ids(9 + i, seed=30 + i) for i, key in enumerate("pqr")}
    z_history = random_ids(10, seed=40)
    expected = {}
    for key, prompt in prompts.items():
        expected[key], _ = reference_turn(model, prompt, greedy(14))
    expected["z"], _ = reference_turn(model, z_history + [3, 4], greedy(6))

    # 16 blocks of 4 = 64 tokens; three sequences of up to 25 tokens, plus z's resident KV.
    engine = make_engine(model, num_blocks=16, max_num_seqs=3)
    one_turn(engine, "z", [], z_history, greedy(1), first_turn=True)
    engine.commit_turn("z")  # z holds 10 tokens (3 blocks)
    seq_ids = {
        key: engine.add_request(key, [], prompt, greedy(14), first_turn=True)
        for key, prompt in prompts.items()
    }
    seq_ids["z"] = engine.add_request("z", z_history, [3, 4], greedy(6), first_turn=False)
    # Finished turns are committed at once: until then their KV is pinned.
    finished = run_to_finish(engine, commit=True)
    for key, seq_id in seq_ids.items():
        assert finished[seq_id].token_ids == expected[key].token_ids, key
    stats = engine.stats()
    assert stats.preemptions >= 2
    # z waited (max_num_seqs) pinned; the running sequences took its blocks back.
    z_counts = finished[seq_ids["z"]].counts
    assert (z_counts.cached_tokens, z_counts.miss_reason) == (0, MissReason.EVICTED)
    # Counted as the turns committed, as the ledger counts them: z's first admission found its
    # KV, but its turn ended a miss (preempted). 4 new threads (z's first turn included).
    assert (stats.hits, stats.misses["new_thread"], stats.misses["evicted"]) == (0, 4, 1)
    assert stats.cached_tokens == sum(e.counts.cached_tokens for e in finished.values())
    engine.kv.check_integrity()


def test_a_cancelled_turn_leaves_the_last_committed_length(model):
    engine = make_engine(model)
    first = one_turn(engine, "t", [], random_ids(10, seed=5), greedy(4), first_turn=True)
    engine.commit_turn("t")
    history = random_ids(10, seed=5) + first.token_ids  # 14 tokens, 13 of them cached

    # Cancelled while waiting: nothing computed, the committed 13 cached tokens stay.
    seq_id = engine.add_request("t", history, [1, 2, 3], greedy(5), first_turn=False)
    assert engine.abort(seq_id)
    assert engine.thread_state("t").cached_tokens == 13
    assert not engine.thread_state("t").pinned

    # Cancelled mid-decode: the history (now fully computed) stays, the new tokens go.
    seq_id = engine.add_request("t", history, [1, 2, 3], greedy(5), first_turn=False)
    engine.step()
    engine.step()
    assert engine.abort(seq_id)
    state = engine.thread_state("t")
    assert (state.cached_tokens, state.num_blocks, state.pinned) == (14, 4, False)
    assert engine.abort(seq_id) is False  # twice is nothing

    # Finished, then rolled back by the service (the database transaction failed).
    event = one_turn(engine, "t", history, [1, 2, 3], greedy(5))
    assert event.counts.cached_tokens == 14
    assert engine.rollback_turn("t")
    assert engine.thread_state("t").cached_tokens == 14
    assert engine.rollback_turn("t") is False
    with pytest.raises(NoFinishedTurn):
        engine.commit_turn("t")

    # The next turn reuses exactly the committed history and is still correct.
    event = one_turn(engine, "t", history, [4, 5], greedy(5))
    assert (event.counts.cached_tokens, event.counts.miss_reason) == (14, None)
    want, _ = reference_turn(model, history + [4, 5], greedy(5))
    assert event.token_ids == want.token_ids


def test_a_failed_step_fails_its_requests_rolls_back_and_the_engine_goes_on(model):
    failing = {"armed": False}

    def hook(seqs, logits):
        if failing["armed"]:
            failing["armed"] = False
            raise RuntimeError("device fell over")

    engine = make_engine(model, on_logits=hook)
    prompt = random_ids(9, seed=6)
    first = one_turn(engine, "t", [], prompt, greedy(3), first_turn=True)
    engine.commit_turn("t")
    history = prompt + first.token_ids
    seq_t = engine.add_request("t", history, [7, 8], greedy(4), first_turn=False)
    seq_u = engine.add_request("u", [], random_ids(6, seed=7), greedy(4), first_turn=True)
    failing["armed"] = True
    outputs = engine.step()
    assert {o.seq_id for o in outputs} == {seq_t, seq_u}
    assert all(isinstance(o.error, RuntimeError) and o.finished for o in outputs)
    assert engine.thread_state("t").cached_tokens == len(history) - 1
    assert not engine.thread_state("t").pinned
    assert not engine.thread_state("u").resident
    assert not engine.has_unfinished()
    event = one_turn(engine, "t", history, [7, 8], greedy(4))
    want, _ = reference_turn(model, history + [7, 8], greedy(4))
    assert event.token_ids == want.token_ids


def test_no_block_leaks_after_mixed_cancellations(model):
    engine = make_engine(model, num_blocks=40, max_batch_tokens=12, max_num_seqs=3)
    keys = [f"t{i}" for i in range(6)]
    seq_ids = {
        key: engine.add_request(key, [], random_ids(8 + i, seed=i), greedy(6), first_turn=True)
        for i, key in enumerate(keys)
    }
    for _ in range(3):
        engine.step()
    engine.abort(seq_ids["t0"])  # running
    engine.abort(seq_ids["t5"])  # still waiting
    finished = run_to_finish(engine)
    assert set(finished) == {seq_ids[k] for k in keys[1:5]}
    engine.commit_turn("t1")
    engine.rollback_turn("t2")
    engine.abort(seq_ids["t3"])  # finished, awaiting commit: the stream went away
    engine.commit_turn("t4")
    engine.kv.check_integrity()
    stats = engine.stats()
    assert stats.num_pinned_threads == 0
    # What stays is exactly the resident KV of the committed threads.
    held = {k: engine.thread_state(k).num_blocks for k in keys}
    assert held["t0"] + held["t5"] + held["t2"] + held["t3"] == 0  # nothing before this turn
    assert stats.num_used_blocks == held["t1"] + held["t4"] > 0

    seq_id = engine.add_request("t1", [], [1, 2], greedy(1), first_turn=True)
    with pytest.raises(ThreadInFlight):
        engine.add_request("t1", [], [1, 2, 3], greedy(1), first_turn=True)
    engine.abort(seq_id)
    for key in keys:
        engine.forget_thread(key)
    engine.kv.check_integrity()
    assert engine.stats().num_used_blocks == 0


def test_residency_off_recomputes_every_turn_and_frees_its_blocks(model):
    engine = make_engine(model, residency=False)
    prompt = random_ids(11, seed=8)
    first = one_turn(engine, "t", [], prompt, greedy(3), first_turn=True)
    engine.commit_turn("t")
    assert engine.stats().num_used_blocks == 0
    second = one_turn(engine, "t", prompt + first.token_ids, [4], greedy(3))
    engine.commit_turn("t")
    assert (second.counts.cached_tokens, second.counts.miss_reason) == (0, MissReason.DISABLED)
    assert second.counts.computed_tokens == 15
    assert engine.stats().misses["disabled"] == 2


def test_requests_that_cannot_run_are_refused_and_the_pool_limit_stops_growth(model):
    engine = make_engine(model, num_blocks=4)  # 16 tokens of KV
    with pytest.raises(ValueError, match="KV pool holds at most 16"):
        engine.add_request("big", [], random_ids(17, seed=1), greedy(1), first_turn=True)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request("bad", [], [5, 101], greedy(1), first_turn=True)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("bad", [], [], greedy(1), first_turn=True)
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request("bad", [], [1], SamplingParams(temperature=-1), first_turn=True)
    with pytest.raises(ValueError, match="top_p"):
        engine.add_request("bad", [], [1], SamplingParams(top_p=0), first_turn=True)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.add_request("bad", [], [1], SamplingParams(stop=("x",)), first_turn=True)
    assert engine.stats().num_pinned_threads == 0  # nothing was pinned by a refusal
    # A sequence that outgrows the whole pool ends with "length" at 16 tokens.
    event = one_turn(engine, "t", [], random_ids(12, seed=2), greedy(50), first_turn=True)
    assert (event.finish_reason, len(event.token_ids)) == ("length", 5)
    engine.commit_turn("t")
    assert engine.thread_state("t").cached_tokens == 16


def test_context_limit_ends_generation_with_length(model):
    engine = make_engine(model, max_model_len=20)
    with pytest.raises(ValueError, match="context is 20 tokens"):
        engine.add_request("t", [], random_ids(20, seed=3), greedy(1), first_turn=True)
    event = one_turn(engine, "t", [], random_ids(15, seed=3), greedy(50), first_turn=True)
    assert (event.finish_reason, len(event.token_ids)) == ("length", 5)


def test_stop_tokens_and_stop_strings(model):
    letters = "abcdefghij"

    def decode(ids):
        return "".join(letters[i % 10] for i in ids)

    prompt = random_ids(8, seed=4)
    plain = make_engine(model, decode=decode)
    free = one_turn(plain, "t", [], prompt, greedy(12), first_turn=True)
    text = decode(free.token_ids)
    assert free.text == text

    # An end-of-turn id: generation stops on it, the id is kept, its text is not.
    stop_id = free.token_ids[4]
    engine = make_engine(model, decode=decode, stop_token_ids=[stop_id])
    first_at = free.token_ids.index(stop_id)
    event = one_turn(
        engine, "t", [], prompt, SamplingParams(max_tokens=12, temperature=0), first_turn=True
    )
    assert event.finish_reason == "stop"
    assert event.token_ids == free.token_ids[: first_at + 1]
    assert event.text == text[:first_at]
    ignoring = one_turn(
        engine,
        "u",
        [],
        prompt,
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
        first_turn=True,
    )
    assert ignoring.token_ids == free.token_ids

    # A stop string: the text is cut before it, the token ids stay as sampled, and the
    # streamed pieces add up to the final text.
    stop = text[6:8]
    cut = text.index(stop)
    engine = make_engine(model, decode=decode)
    engine.add_request(
        "t",
        [],
        prompt,
        SamplingParams(max_tokens=12, temperature=0, stop=(stop, "zz")),
        first_turn=True,
    )
    pieces, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            for ev in out.events:
                if isinstance(ev, FinishEvent):
                    final = ev
                else:
                    pieces.append(ev.text)
    assert final.finish_reason == "stop"
    assert final.text == text[:cut]
    assert final.token_ids == free.token_ids[: cut + len(stop)]
    assert "".join(pieces) == final.text


def test_concurrent_conversations_keep_their_histories_consecutive(model, monkeypatch):
    """Four threads decoding side by side, turn after turn: each thread's blocks stay
    consecutive in the pool (each keeps room after its last block while in a turn), and the CPU
    attention's mirror copies each step's new tokens out of the pool and never a thread's
    history again, whatever the placement; the replies are those of a pool that hands out blocks
    in queue order (tables interleaved)."""
    from app.engine.network.attention.thread_mirror import ThreadMirror

    copied: list[tuple[int, int]] = []  # per step: positions copied into the mirror, new tokens

    def begin_step(self, thread_keys, tables, cached_lens, seq_lens, *args):
        step = original(self, thread_keys, tables, cached_lens, seq_lens, *args)
        new_tokens = sum(end - start for start, end in zip(cached_lens, seq_lens, strict=True))
        copied.append((step.copy_slots.numel(), new_tokens))
        return step

    original = ThreadMirror.begin_step
    monkeypatch.setattr(ThreadMirror, "begin_step", begin_step)

    def play(engine) -> tuple[list[list[int]], int]:
        """Every reply, and how many times a thread's table was found not consecutive."""
        histories: dict[str, list[int]] = {f"t{i}": [] for i in range(4)}
        replies, scattered = [], 0
        for turn in range(4):
            news = {key: random_ids(9, seed=10 * turn + i) for i, key in enumerate(histories)}
            seq_ids = {
                key: engine.add_request(key, histories[key], new, greedy(11), first_turn=turn == 0)
                for key, new in news.items()
            }
            finished = run_to_finish(engine, commit=True)
            for key, seq_id in seq_ids.items():
                reply = finished[seq_id].token_ids
                replies.append(reply)
                histories[key] += news[key] + reply
                table = engine.kv.peek(key).block_table
                scattered += table != list(range(table[0], table[0] + len(table)))
        return replies, scattered

    placed, scattered = play(make_engine(model, num_blocks=256, max_batch_tokens=64))
    assert scattered == 0
    assert copied and all(num == new for num, new in copied)  # only the new tokens, every step
    copied.clear()
    queue_order = make_engine(model, num_blocks=256, max_batch_tokens=64)
    pool = queue_order.kv.pool
    monkeypatch.setattr(queue_order.kv, "_allocate", lambda entry, num, *_: pool.allocate(num))
    interleaved, scattered = play(queue_order)
    assert scattered > 0
    assert copied and all(num == new for num, new in copied)
    assert interleaved == placed
