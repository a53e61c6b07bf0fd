"""The CPU decode attention kernel (kernels/cpu_decode_attention.cpp) against the torch reference
over the same rows: head sizes, query-head groups (more than one pass's 16 included), rows out of
order, lengths from one key to the whole capacity, scores far apart; its argument checks; the
OpenMP runtime it runs on; and a mirror step's writes. (The library's build: test_cpu_library.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.engine.network.attention.cpu_backend import decode_attention
from kernels import cpu_decode_attention
from kernels.cpu_decode_attention import DecodeRows, load_decode_attention


@pytest.fixture(scope="module")
def kernel():
    built = load_decode_attention()
    assert built is not None, "the kernel did not build (see the warning logged)"
    return built


def reference(q, keys, values, rows, lens, scale):
    """torch's products over each sequence's own row."""
    return torch.cat(
        [
            decode_attention(
                q[b : b + 1], keys[r : r + 1, :, :n], values[r : r + 1, :, :n], None, scale
            )
            for b, (r, n) in enumerate(zip(rows, lens, strict=True))
        ]
    )


def mirror_layer(num_rows, num_kv_heads, capacity, head_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    both = torch.randn(2, num_rows, num_kv_heads, capacity, head_dim, generator=gen)
    return both[0], both[1]


@pytest.mark.parametrize("head_dim", [16, 32, 64, 80, 96, 128, 256])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(12, 4), (4, 4), (8, 1), (40, 2)])
def test_the_kernel_is_the_reference(kernel, head_dim, num_heads, num_kv_heads):
    """Groups of 3, 1, 8 and 20 query heads per KV head (20: two passes over the keys)."""
    keys, values = mirror_layer(5, num_kv_heads, 70, head_dim, seed=head_dim + num_heads)
    rows, lens = [3, 0, 4, 1], [70, 1, 33, 64]  # out of order, one key, the whole capacity
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(len(rows), num_heads, head_dim, generator=gen)
    scale = head_dim**-0.5
    got = kernel(q, keys, values, DecodeRows(rows, lens), scale)
    torch.testing.assert_close(
        got, reference(q, keys, values, rows, lens, scale), atol=1e-5, rtol=1e-5
    )


def test_scores_far_apart_and_long_rows(kernel):
    """Scores hundreds apart (exp underflows to 0 for all but a few keys) and 3,000 keys."""
    keys, values = mirror_layer(2, 2, 3000, 64, seed=7)
    gen = torch.Generator().manual_seed(2)
    q = 8 * torch.randn(2, 6, 64, generator=gen)
    rows, lens = [1, 0], [3000, 2999]
    got = kernel(q, keys, values, DecodeRows(rows, lens), 1.0)
    torch.testing.assert_close(
        got, reference(q, keys, values, rows, lens, 1.0), atol=1e-5, rtol=1e-5
    )


def test_many_threads_each_row_once(kernel):
    """More tasks than OpenMP threads, rows of every length: every output is its own row's."""
    keys, values = mirror_layer(16, 4, 200, 64, seed=3)
    rows = list(range(15, -1, -1))
    lens = [1 + 13 * r for r in rows]
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(16, 12, 64, generator=gen)
    got = kernel(q, keys, values, DecodeRows(rows, lens), 0.125)
    torch.testing.assert_close(
        got, reference(q, keys, values, rows, lens, 0.125), atol=1e-5, rtol=1e-5
    )


def test_bad_arguments_are_refused_before_the_c_code_reads_them(kernel):
    keys, values = mirror_layer(2, 2, 10, 64, seed=0)
    q = torch.randn(1, 4, 64)
    one = DecodeRows([1], [10])
    with pytest.raises(ValueError, match="float32"):
        kernel(q.double(), keys, values, one, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        kernel(q, keys, values, DecodeRows([2], [5]), 1.0)  # no row 2
    with pytest.raises(ValueError, match="do not fit"):
        kernel(q, keys, values, DecodeRows([0], [11]), 1.0)  # past the capacity
    with pytest.raises(ValueError, match="do not fit"):
        kernel(torch.randn(2, 4, 64), keys, values, one, 1.0)  # two queries, one sequence
    with pytest.raises(ValueError, match="does not fit"):
        kernel(torch.randn(1, 3, 64), keys, values, one, 1.0)  # 3 query heads over 2
    with pytest.raises(ValueError, match="keys' shape and strides"):
        kernel(q, keys, values[:, :, :5], one, 1.0)
    with pytest.raises(ValueError, match="contiguous in D|does not fit"):
        kernel(q, keys.transpose(2, 3), values.transpose(2, 3), one, 1.0)
    with pytest.raises(ValueError, match="lens >= 1"):
        DecodeRows([0], [0])
    assert not kernel.supports(48)
    odd_keys, odd_values = mirror_layer(1, 1, 4, 48, seed=0)
    with pytest.raises(ValueError, match="not built for head_dim 48"):
        kernel(torch.randn(1, 1, 48), odd_keys, odd_values, DecodeRows([0], [4]), 1.0)


def test_one_openmp_runtime_in_the_process(kernel):
    """The library's libgomp is torch's own (one thread team, not two spinning against each
    other on the same cores)."""
    mapped = {
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if "libgomp" in line
    }
    assert len(mapped) == 1, mapped


def test_store_and_sync_is_store_kv_then_the_mirror_copy(kernel):
    """The step's new tokens into their pool slots (padding skipped, keys a strided view as the
    model's split leaves them), then the listed positions copied into the mirror's rows: the
    same pool and mirror as kernels/store_kv_ref.py followed by MirrorStep.sync_layer's copy."""
    from kernels.store_kv_ref import store_kv_ref

    gen = torch.Generator().manual_seed(5)
    num_blocks, block_size, num_kv_heads, head_dim = 6, 4, 2, 8
    pool = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    mirror = torch.randn(2, 3, num_kv_heads, 10, head_dim, generator=gen)
    fused = torch.randn(3, 4 * num_kv_heads, head_dim, generator=gen)  # keys sit in a wider row
    key, value = fused[:, :num_kv_heads], fused[:, 2 * num_kv_heads : 3 * num_kv_heads]
    slots = torch.tensor([5, -1, 17])  # the second token is padding
    copy_rows, copy_positions = torch.tensor([2, 0, 0]), torch.tensor([9, 0, 3])
    copy_slots = torch.tensor([17, 5, 2])  # two of this step's tokens, one older position
    want_pool, want_mirror = pool.clone(), mirror.clone()
    store_kv_ref(key, value, want_pool[0], want_pool[1], slots)
    for i in range(2):
        new = want_pool[i].flatten(0, 1).index_select(0, copy_slots)
        want_mirror[i][copy_rows, :, copy_positions] = new
    writes = cpu_decode_attention.StepWrites(
        slots, copy_rows, copy_positions, copy_slots, num_slots=24, num_rows=3, capacity=10
    )
    kernel.store_and_sync(key, value, pool[0], pool[1], writes, mirror[0], mirror[1])
    assert torch.equal(pool, want_pool) and torch.equal(mirror, want_mirror)
    # Nothing to store (the tokens already in the pool): the copies alone.
    mirror2 = torch.zeros_like(mirror)
    kernel.store_and_sync(None, None, pool[0], pool[1], writes, mirror2[0], mirror2[1])
    assert torch.equal(mirror2[:, 2, :, 9], want_pool[:, 4, 1])  # slot 17: block 4, offset 1


def test_step_writes_out_of_range_are_refused(kernel):
    ok = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="past 23"):
        cpu_decode_attention.StepWrites(
            torch.tensor([24]), ok, ok, ok, num_slots=24, num_rows=3, capacity=10
        )
    with pytest.raises(ValueError, match="past 2"):
        cpu_decode_attention.StepWrites(
            ok, torch.tensor([0, 3]), ok, ok, num_slots=24, num_rows=3, capacity=10
        )
    with pytest.raises(ValueError, match="negative row or position"):
        cpu_decode_attention.StepWrites(
            ok, ok, torch.tensor([0, -1]), ok, num_slots=24, num_rows=3, capacity=10
        )
    with pytest.raises(ValueError, match="negative slot"):
        cpu_decode_attention.StepWrites(
            ok, ok, ok, torch.tensor([-1, 0]), num_slots=24, num_rows=3, capacity=10
        )
    with pytest.raises(ValueError, match="int64"):
        cpu_decode_attention.StepWrites(ok.int(), ok, ok, ok, num_slots=24, num_rows=3, capacity=10)
    writes = cpu_decode_attention.StepWrites(ok, ok, ok, ok, num_slots=24, num_rows=3, capacity=10)
    pool = torch.zeros(6, 4, 2, 8)
    mirror = torch.zeros(3, 2, 10, 8)
    with pytest.raises(ValueError, match="do not fit the step's slots"):
        kernel.store_and_sync(None, None, pool[:5], pool[:5], writes, mirror, mirror)
    with pytest.raises(ValueError, match="mirror_k must be float32"):
        kernel.store_and_sync(None, None, pool, pool, writes, mirror[:2], mirror[:2])
    with pytest.raises(ValueError, match="each token's heads contiguous"):
        key = torch.zeros(2, 8, 2).transpose(1, 2)  # heads not contiguous
        kernel.store_and_sync(key, key, pool, pool, writes, mirror, mirror)
