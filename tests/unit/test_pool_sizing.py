"""The KV pool and the step budget sized from a fake device's free memory (pure arithmetic)."""

from __future__ import annotations

import pytest

from app.engine.network.pool_sizing import (
    MiB,
    PoolRequest,
    activation_bytes,
    batch_tokens_for_pool,
    plan_pool,
)

GiB = 2**30


def llama_1b(**overrides) -> PoolRequest:
    # Llama-3.2-1B in bf16: 16 layers, 8 KV heads of 64 -> 2 * 16 * 16 * 8 * 64 * 2 bytes a block
    values = dict(
        bytes_per_block=2 * 16 * 16 * 8 * 64 * 2,
        block_size=16,
        hidden_size=2048,
        intermediate_size=8192,
        vocab_size=128256,
        element_size=2,
        max_num_seqs=32,
        is_cuda=True,
    )
    return PoolRequest(**{**values, **overrides})


def test_cuda_pool_takes_its_share_of_free_memory_less_one_steps_activations() -> None:
    request = llama_1b()
    plan = plan_pool(request, free_bytes=139 * GiB)
    usable = int(139 * GiB * 0.9) - activation_bytes(request, 8192)
    assert plan.num_blocks == usable // request.bytes_per_block
    assert plan.num_tokens == plan.num_blocks * 16 > 3_900_000  # 32 KiB a token: ~4M tokens
    assert plan.max_batch_tokens == 8192  # a huge pool: the largest budget
    assert plan.pool_bytes <= 0.9 * 139 * GiB
    assert "tokens" in plan.describe() and "device" in plan.source


def test_budget_follows_a_small_pool_and_settings_win() -> None:
    request = llama_1b(memory_utilization=0.5)
    small = plan_pool(request, free_bytes=2 * GiB)
    # 1 GiB less a 2048-token step's activations (~190 MiB): ~26k tokens, a budget of 2048
    reserve = activation_bytes(request, 2048)
    assert small.num_blocks == (GiB - reserve) // request.bytes_per_block
    assert small.max_batch_tokens == batch_tokens_for_pool(small.num_tokens) == 2048
    fixed = plan_pool(llama_1b(kv_cache_mb=64, max_batch_tokens=300), free_bytes=None)
    assert fixed.pool_bytes <= 64 * MiB and fixed.source == "setting"
    assert fixed.num_blocks == 64 * MiB // llama_1b().bytes_per_block
    assert fixed.max_batch_tokens == 300


def test_cpu_keeps_the_old_defaults() -> None:
    plan = plan_pool(llama_1b(is_cuda=False))
    assert plan.num_blocks == 256 * MiB // llama_1b().bytes_per_block
    assert plan.max_batch_tokens == 512 and plan.source == "cpu default"


@pytest.mark.parametrize(("tokens", "budget"), [(0, 512), (8191, 512), (8192, 1024), (10**7, 8192)])
def test_batch_budget_is_an_eighth_of_the_pool_clamped(tokens: int, budget: int) -> None:
    assert batch_tokens_for_pool(tokens) == budget


def test_too_little_memory_names_the_numbers() -> None:
    with pytest.raises(ValueError, match="not one block"):
        plan_pool(llama_1b(), free_bytes=50 * MiB)
    with pytest.raises(ValueError, match="free memory"):
        plan_pool(llama_1b())
