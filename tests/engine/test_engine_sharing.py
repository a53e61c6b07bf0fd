"""Shared KV blocks in the engine: a prefix served from another thread, fork, rewind, memory.

Exactness: every turn served from shared blocks gives the logits of a full recomputation of its
log (float32, <= 1e-5) and the same greedy reply. The engine checks its block accounting (and
that no sequence writes into a shared block) after every step.
"""

from __future__ import annotations

import pytest
import torch
from engine_testing import LogitsLog, random_ids, random_model, run_to_finish

from app.engine.loading.builtin import build_builtin_model
from app.engine.network.model import CausalLM
from app.engine.runtime.llm_engine import LLMEngine
from app.engine.runtime.types import FinishEvent, MissReason, SamplingParams

ATOL = 1e-5
BS = 4


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model() -> CausalLM:
    return random_model(seed=3)


def make_engine(model, **kwargs) -> LLMEngine:
    kwargs.setdefault("num_blocks", 128)
    kwargs.setdefault("block_size", BS)
    return LLMEngine(model, check_invariants=True, **kwargs)


class Driver:
    """An engine with a logits log; turns commit at once, as the service does."""

    def __init__(self, model, **kwargs) -> None:
        self.model = model
        self.log = LogitsLog()
        self.engine = make_engine(model, on_logits=self.log, **kwargs)
        self.logs: dict[str, list[int]] = {}  # thread -> committed token log

    def turn(self, key, new, *, scope="acct", n=4, first_turn=False) -> FinishEvent:
        history = self.logs.get(key, [])
        seq_id = self.engine.add_request(
            key, history, new, greedy(n), first_turn=first_turn, share_scope=scope
        )
        (event,) = run_to_finish(self.engine, commit=True).values()
        self.logs[key] = history + new + event.token_ids
        assert_exact(self.model, history + new, event, self.log.rows[seq_id], n)
        return event

    def fork(self, parent, child, num_tokens) -> int:
        self.logs[child] = self.logs[parent][:num_tokens]
        held = self.engine.fork_thread(parent, child, self.logs[child])
        self.engine.kv.check_integrity()
        return held

    def rewind(self, key, num_tokens) -> int:
        del self.logs[key][num_tokens:]
        held = self.engine.rewind_thread(key, self.logs[key])
        self.engine.kv.check_integrity()
        return held


def assert_exact(model, prompt, event, rows, n) -> None:
    """The same prompt computed from scratch gives the same logits and greedy tokens."""
    log = LogitsLog()
    ref = make_engine(model, residency=False, on_logits=log)
    seq_id = ref.add_request("ref", [], prompt, greedy(n), first_turn=True)
    (want,) = run_to_finish(ref).values()
    assert event.token_ids == want.token_ids
    assert len(rows) == len(log.rows[seq_id])
    for got, exp in zip(rows, log.rows[seq_id], strict=True):
        torch.testing.assert_close(got, exp, atol=ATOL, rtol=0)


def test_a_new_thread_is_served_from_another_threads_prefix_exactly(model):
    d = Driver(model)
    system = random_ids(18, seed=10)  # 4 full blocks and 2 tokens
    d.turn("a", system + random_ids(5, seed=11), first_turn=True)
    # b's prefix: a's 4 full blocks (shared) and a copy of a's block 4 for the last 2 system
    # tokens; its logits are checked against a recomputation (Driver.turn).
    event = d.turn("b", system + random_ids(6, seed=12), first_turn=True)
    counts = event.counts
    assert (counts.cached_tokens, counts.shared_tokens, counts.miss_reason) == (
        18,
        16,
        MissReason.NEW_THREAD,
    )
    assert counts.computed_tokens == 6  # its own message only
    assert d.engine.stats().block_copies == 1
    stats = d.engine.stats()
    assert stats.shared_tokens == 16 and stats.num_shared_blocks == 4
    assert stats.unique_tokens < stats.logical_tokens
    # Another scope (account) gets nothing from it.
    event = d.turn("c", system + random_ids(6, seed=12), scope="other", first_turn=True)
    assert (event.counts.cached_tokens, event.counts.shared_tokens) == (0, 0)


@pytest.mark.parametrize("cut", [12, 14], ids=["block-boundary", "mid-block"])
def test_a_fork_computes_only_its_new_tokens_and_equals_a_recomputation(model, cut):
    d = Driver(model)
    d.turn("p", random_ids(9, seed=20), first_turn=True)
    d.turn("p", random_ids(3, seed=21))  # log: 9 + 4 + 3 + 4 = 20 tokens
    assert d.fork("p", "c", cut) == cut
    copies = d.engine.stats().block_copies
    assert copies == (1 if cut % BS else 0)
    new = random_ids(5, seed=22)
    event = d.turn("c", new)
    counts = event.counts
    assert (counts.cached_tokens, counts.computed_tokens, counts.miss_reason) == (cut, 5, None)
    assert counts.shared_tokens == cut - cut % BS
    # The parent is untouched by its child's writes.
    event = d.turn("p", random_ids(2, seed=23))
    assert (event.counts.cached_tokens, event.counts.miss_reason) == (19, None)
    # A fork of the fork, mid-block again.
    assert d.fork("c", "cc", cut + 3) == cut + 3
    event = d.turn("cc", random_ids(4, seed=24))
    assert (event.counts.cached_tokens, event.counts.computed_tokens) == (cut + 3, 4)


def test_a_rewound_thread_keeps_the_kv_of_what_remains_exactly(model):
    d = Driver(model)
    d.turn("t", random_ids(7, seed=30), first_turn=True)
    first = len(d.logs["t"])  # 11
    d.turn("t", random_ids(6, seed=31))
    d.fork("t", "sibling", len(d.logs["t"]))  # t's blocks are shared now
    assert d.rewind("t", first) == first  # mid-block of a shared block: copied first
    assert d.engine.stats().block_copies >= 1
    event = d.turn("t", random_ids(3, seed=32))
    assert (event.counts.cached_tokens, event.counts.computed_tokens) == (first, 3)
    event = d.turn("sibling", random_ids(2, seed=33))
    assert event.counts.miss_reason is None


def test_deleting_a_thread_never_frees_blocks_another_uses(model):
    d = Driver(model)
    d.turn("p", random_ids(14, seed=40), first_turn=True)
    d.fork("p", "c", len(d.logs["p"]))
    d.engine.forget_thread("p")
    d.engine.kv.check_integrity()
    event = d.turn("c", random_ids(3, seed=41))
    # Its 3 new tokens and the parent's last sampled one (never computed).
    assert (event.counts.miss_reason, event.counts.computed_tokens) == (None, 4)


def test_a_hundred_threads_on_one_system_prompt_hold_it_once():
    tiny, _ = build_builtin_model("builtin-tiny-random")
    bs = 16
    engine = LLMEngine(tiny, num_blocks=400, block_size=bs, check_invariants=True)
    system = random_ids(1000, seed=50, vocab_size=256)
    prefix_blocks = len(system) // bs  # 62 full blocks; 8 tokens left in a partial one
    for i in range(100):
        # A first id no other thread's message has: nothing of the message is found cached.
        own = [i, *random_ids(7, seed=100 + i, vocab_size=256)]
        engine.add_request(f"t{i}", system, own, greedy(2), first_turn=True, share_scope="acct")
        (event,) = run_to_finish(engine, commit=True).values()
        counts = event.counts
        if i == 0:
            assert counts.computed_tokens == 1008
        else:
            # Its own tokens only: the system prompt's 62 full blocks are shared, its last 8
            # tokens come in a private copy of thread 0's block 62 (cached, not shared).
            assert counts.computed_tokens == len(own)
            assert counts.cached_tokens == len(system)
            assert counts.shared_tokens == prefix_blocks * bs
    stats = engine.stats()
    assert stats.block_copies == 99
    # Per thread, privately: 8 system tokens + 8 own + 1 generated with KV = 17, two blocks.
    private_blocks = 2
    assert stats.num_used_blocks == prefix_blocks + 100 * private_blocks
    assert stats.logical_tokens == 100 * 1009
    assert stats.unique_tokens == prefix_blocks * bs + 100 * 17
    assert stats.sharing_ratio > 10
