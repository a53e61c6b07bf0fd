"""Captured steps (network/compiled_step.py, what CUDA graphs replay), decodes and short
prefills beside them, give the eager steps' logits, on the CPU: the Triton backend under Triton's interpreter (this folder's conftest),
and `rerun_capture` standing in for a graph: each replay runs the recorded forward again over
the same static inputs, so whatever the step copies into them, and the padding rows it leaves,
is what a graph would read. A CUDA run of the same comparison is `make gpu-check`."""

from __future__ import annotations

import pytest
import torch

from app.engine.network.compiled_step import StepCache, eager, rerun_capture
from app.engine.runtime.llm_engine import LLMEngine
from tests.engine.engine_testing import (
    count_replays,
    play_changing_batches,
    random_model,
    tiny_config,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(num_heads=4, num_kv_heads=2, head_dim=16), seed=5)


def triton_engine(model) -> LLMEngine:
    return LLMEngine(
        model,
        num_blocks=64,
        block_size=4,
        max_num_seqs=3,
        max_model_len=96,
        attention_backend="triton",
        check_invariants=True,
    )


def captured(engine: LLMEngine, buckets, mixed=()) -> StepCache:
    steps = StepCache(
        engine.runner.model,
        engine.pool.layer_caches,
        buckets,
        compile_fn=eager,
        capture=rerun_capture,
        attn=engine.runner.attn,
        max_model_len=engine.max_model_len,
        mixed_buckets=mixed,
    )
    assert steps.warm_up() == [(b, b) for b in sorted(buckets)] + sorted(mixed)
    engine.runner.step_cache = steps
    return steps


@pytest.fixture(scope="module")
def expected(model) -> list[torch.Tensor]:
    return play_changing_batches(triton_engine(model))


@pytest.mark.parametrize("buckets", [(1, 2, 4), (4,)])
def test_captured_decode_steps_equal_the_eager_ones(model, expected, buckets):
    """(4,): every decode batch (3, 2 and 1 sequences as threads finish) replays one bucket, so
    rows a larger batch filled must turn back into padding, or they overwrite its slots."""
    engine = triton_engine(model)
    replays = count_replays(captured(engine, buckets))
    got = play_changing_batches(engine)
    assert sorted({seqs for _, seqs, q in replays if q == 1}) == [1, 2, 3]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mixed", [[(32, 4)], [(16, 2), (32, 4)]])
def test_captured_mixed_steps_equal_the_eager_ones(model, expected, mixed):
    """Prefills of 5 to 9 tokens, alone and beside other threads' prefills and decodes: 21
    tokens of 3 sequences, then 5 of 1, then 12 of 2. With one shape, (32, 4), each step is
    smaller than the one before it: every token row and sequence a larger step filled must be
    padding again."""
    engine = triton_engine(model)
    replays = count_replays(captured(engine, (1, 2, 4), mixed=mixed))
    got = play_changing_batches(engine)
    assert [(tokens, seqs) for tokens, seqs, q in replays if q > 1] == [(21, 3), (5, 1), (12, 2)]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def test_a_moved_pool_is_captured_again(model, expected):
    engine = triton_engine(model)
    steps = captured(engine, (2, 4))
    assert steps.num_captures == 2
    caches = engine.pool.layer_caches
    for i, (k, v) in enumerate(caches):  # new tensors, same contents
        caches[i] = (k.clone(), v.clone())
    got = play_changing_batches(engine)
    assert steps.num_captures == 4  # both buckets, once, at the first decode step after the move
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def test_only_a_backend_without_step_state_can_be_captured(model):
    engine = LLMEngine(model, num_blocks=16, block_size=4, attention_backend="torch")
    with pytest.raises(ValueError, match="keeps no step state"):
        StepCache(
            model,
            engine.pool.layer_caches,
            (1,),
            capture=rerun_capture,
            attn=engine.runner.attn,
            max_model_len=64,
        )
