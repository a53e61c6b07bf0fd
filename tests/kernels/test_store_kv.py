"""kernels/store_kv.py against kernels/store_kv_ref.py under the Triton interpreter."""

import pytest
import torch

from kernels.store_kv import store_kv
from kernels.store_kv_ref import store_kv_ref


def _fused_kv(num_tokens: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """Keys and values as strided views of one fused qkv projection, as the model makes them."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, 3 + 2 * num_kv_heads, head_dim, generator=gen).to(dtype)
    return qkv[:, 3 : 3 + num_kv_heads], qkv[:, 3 + num_kv_heads :]


def _pool(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    pool = pool.to(dtype)
    return pool[0], pool[1]


def _check_against_ref(key, value, k_cache, v_cache, slot_mapping) -> None:
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    store_kv_ref(key, value, k_expected, v_expected, slot_mapping)
    store_kv(key, value, k_cache, v_cache, slot_mapping)
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)


@pytest.mark.parametrize(
    ("num_kv_heads", "head_dim", "block_size", "dtype"),
    [
        (2, 16, 16, torch.float32),
        (2, 16, 32, torch.float16),
        (1, 64, 16, torch.float16),
        (1, 64, 32, torch.float32),
        (8, 128, 16, torch.float32),
        (8, 128, 32, torch.float16),
        (3, 80, 16, torch.float16),  # neither heads nor head_dim a power of two
        (32, 128, 16, torch.float32),  # too wide for one program: heads split over two
    ],
)
def test_store_kv_matches_reference(num_kv_heads, head_dim, block_size, dtype):
    num_tokens, num_blocks = 37, 5
    key, value = _fused_kv(num_tokens, num_kv_heads, head_dim, dtype, seed=1)
    k_cache, v_cache = _pool(num_blocks, block_size, num_kv_heads, head_dim, dtype, seed=2)
    gen = torch.Generator().manual_seed(3)
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slot_mapping[[0, 7, num_tokens - 1]] = -1  # padding tokens are skipped
    _check_against_ref(key, value, k_cache, v_cache, slot_mapping)


def test_store_kv_casts_to_the_cache_dtype():
    key, value = _fused_kv(9, 2, 32, torch.float32, seed=4)
    k_cache, v_cache = _pool(2, 16, 2, 32, torch.float16, seed=5)
    _check_against_ref(key, value, k_cache, v_cache, torch.arange(3, 12))


def test_store_kv_single_token_and_all_padding():
    key, value = _fused_kv(1, 2, 16, torch.float32, seed=6)
    k_cache, v_cache = _pool(2, 16, 2, 16, torch.float32, seed=7)
    _check_against_ref(key, value, k_cache, v_cache, torch.tensor([31]))
    before = k_cache.clone()
    store_kv(key, value, k_cache, v_cache, torch.tensor([-1]))
    assert torch.equal(k_cache, before)


def test_store_kv_empty_batch_is_a_no_op():
    key = torch.empty(0, 2, 16)
    k_cache, v_cache = _pool(2, 16, 2, 16, torch.float32, seed=8)
    before = k_cache.clone()
    store_kv(key, key, k_cache, v_cache, torch.empty(0, dtype=torch.int64))
    assert torch.equal(k_cache, before)


def test_store_kv_drops_a_slot_past_the_pool():
    # The reference raises; the kernel cannot without a device sync, so it must at least not
    # write outside the pool, and still store the other tokens.
    key, value = _fused_kv(3, 2, 16, torch.float32, seed=9)
    k_cache, v_cache = _pool(2, 16, 2, 16, torch.float32, seed=10)
    expected = k_cache.clone()
    store_kv_ref(key[:2], value[:2], expected, v_cache.clone(), torch.tensor([4, 5]))
    store_kv(key, value, k_cache, v_cache, torch.tensor([4, 5, 2 * 16]))
    assert torch.equal(k_cache, expected)


def _valid_args():
    key, value = _fused_kv(4, 2, 16, torch.float32, seed=11)
    k_cache, v_cache = _pool(2, 16, 2, 16, torch.float32, seed=12)
    return {
        "key": key,
        "value": value,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "slot_mapping": torch.arange(4),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"slot_mapping": torch.arange(4, dtype=torch.int32)}, "slot_mapping must have dtype"),
        ({"slot_mapping": torch.arange(3)}, "3 entries for 4 tokens"),
        ({"key": torch.randn(4, 2, 16)[:, :, :8]}, "one shape"),
        (
            {"key": torch.randn(4, 16, 2).transpose(1, 2), "value": torch.randn(4, 2, 16)},
            "last dim",
        ),
        ({"key": torch.randn(4, 3, 16), "value": torch.randn(4, 3, 16)}, "per slot"),
        ({"key": torch.randn(4, 32), "value": torch.randn(4, 32)}, "key must be"),
        ({"k_cache": torch.randn(2, 16, 16, 2).transpose(2, 3)}, "contiguous"),
        ({"v_cache": torch.randn(2, 16, 2, 16, dtype=torch.float16)}, "one dtype"),
        (
            {
                "k_cache": torch.randn(2, 16, 2, 16).int(),
                "v_cache": torch.randn(2, 16, 2, 16).int(),
            },
            "k_cache must have dtype",
        ),
        ({"key": torch.randn(4, 2, 16, device="meta")}, "one device"),
    ],
)
def test_store_kv_rejects_bad_arguments(change, message):
    args = _valid_args() | change
    with pytest.raises(ValueError, match=message):
        store_kv(**args)
