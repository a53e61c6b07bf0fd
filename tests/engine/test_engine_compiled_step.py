"""The compiled decode step (network/compiled_step.py) gives the eager step's logits: float32,
a tiny model, a few turns whose decode batches change size (padded up to the buckets 1 and 2,
past the largest bucket eager), prefills eager in both."""

import time

import pytest
import torch

from app.engine.network.compiled_step import StepCache
from app.engine.runtime.llm_engine import LLMEngine
from tests.engine.engine_testing import play_changing_batches as play
from tests.engine.engine_testing import random_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_the_compiled_decode_step_equals_the_eager_one():
    model = random_model()
    eager = LLMEngine(model, num_blocks=64, block_size=4, max_num_seqs=3, check_invariants=True)
    expected = play(eager)

    compiled = LLMEngine(model, num_blocks=64, block_size=4, max_num_seqs=3, check_invariants=True)
    steps = StepCache(model, compiled.pool.layer_caches, buckets=(1, 2))
    assert steps.warm_up() == [(1, 1), (2, 2)]
    compiled.runner.step_cache = steps
    runs = []
    original_run = steps.run
    steps.run = lambda ids, *rest: runs.append(ids.shape[0]) or original_run(ids, *rest)
    got = play(compiled)

    assert sorted(set(runs)) == [1, 2]  # both buckets served, batch 1 padded to none, 3 eager
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def test_the_eager_mechanism_equals_the_plain_step():
    """compile_fn = identity: the same padding and attention op, eager (what a CUDA-graph
    capture runs)."""
    model = random_model()
    eager = LLMEngine(model, num_blocks=64, block_size=4, max_num_seqs=3)
    expected = play(eager)
    engine = LLMEngine(model, num_blocks=64, block_size=4, max_num_seqs=3, check_invariants=True)
    steps = StepCache(model, engine.pool.layer_caches, buckets=(2, 4), compile_fn=lambda f: f)
    assert steps.warm_up() == [(2, 2), (4, 4)]
    engine.runner.step_cache = steps
    for g, e in zip(play(engine), expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def slow_identity(fn):
    time.sleep(0.05)
    return fn


def test_a_bucket_serves_only_step_cache_it_compiled():
    model = random_model()
    engine = LLMEngine(model, num_blocks=16, block_size=4, max_num_seqs=4)
    steps = StepCache(model, engine.pool.layer_caches, buckets=(2, 4), compile_fn=slow_identity)
    assert steps.shape_for(1, 1, 1) == (2, 2) and steps.shape_for(3, 3, 1) == (4, 4)
    assert steps.shape_for(5, 5, 1) is None
    assert not steps.can_run(2, 2, 1)  # not warmed up: eager
    # the first bucket starts, the budget is spent after
    assert steps.warm_up(budget_s=0.01) == [(2, 2)]
    assert steps.can_run(1, 1, 1) and steps.can_run(2, 2, 1)
    assert not steps.can_run(3, 1, 3)  # a prefill chunk: no mixed shapes without a capture
    assert not steps.can_run(3, 3, 1)  # bucket 4 not compiled
