"""LinearGroup: one prepacked GEMM (the CPU library's layout, or oneDNN's) gives what the separate
linears give, and never a stale weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.engine.network.packed_linear import SMALL_BATCH, LinearGroup, can_pack
from kernels.cpu_library import load_cpu_library

pytestmark = pytest.mark.skipif(
    not can_pack(torch.empty(1)), reason="this torch build has no oneDNN prepacking"
)


def linears(*shapes: tuple[int, int, bool], seed: int = 0) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(n_in, n_out, bias=bias) for n_in, n_out, bias in shapes]


def plain(group: LinearGroup, x: torch.Tensor) -> list[torch.Tensor]:
    return [linear(x) for linear in group.linears]


@pytest.mark.parametrize("native", [True, False], ids=["library", "onednn"])
@pytest.mark.parametrize("rows", [1, 3, 5, 8, 13, 67, 100])
@pytest.mark.parametrize(
    "shapes",
    [
        [(48, 48, False), (48, 16, False), (48, 16, False)],  # q, k, v
        [(48, 48, True), (48, 16, True), (48, 16, True)],  # Qwen2: biases
        [(48, 40, True), (48, 24, False)],  # a bias on one member only
        [(96, 17, False)],  # one linear, odd width
        [(40, 130, True)],  # three blocks of 64 outputs, the last two wide
    ],
)
def test_packed_group_matches_separate_linears(shapes, rows, native):
    if native and load_cpu_library() is None:
        pytest.skip("the CPU library did not build")
    group = LinearGroup(*linears(*shapes))
    x = torch.randn(rows, shapes[0][0])
    with torch.inference_mode():
        expected = plain(group, x)
        assert group.pack(native=native) and group.is_packed
        assert (group.native is not None) == native
        got = group(x)
    assert [t.shape for t in got] == [t.shape for t in expected]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


def test_unpacked_group_runs_the_plain_linears():
    group = LinearGroup(*linears((32, 8, True), (32, 8, False)))
    x = torch.randn(4, 32)
    assert not group.is_packed
    for g, e in zip(group(x), plain(group, x), strict=True):
        assert torch.equal(g, e)


def test_a_weight_written_in_place_after_packing_is_not_served_stale():
    group = LinearGroup(*linears((32, 8, True), (32, 8, False)))
    group.pack()
    with torch.no_grad():
        group.linears[0].weight.mul_(2)
    x = torch.randn(4, 32)
    assert not group.is_packed
    for g, e in zip(group(x), plain(group, x), strict=True):
        assert torch.equal(g, e)
    assert group.pack() and group.is_packed  # packing again serves the new weight
    torch.testing.assert_close(group(x)[0], plain(group, x)[0], rtol=0, atol=1e-5)


def test_a_replaced_weight_or_bias_is_not_served_stale():
    group = LinearGroup(*linears((32, 8, True)))
    group.pack()
    group.linears[0].bias = nn.Parameter(torch.ones(8))
    assert not group.is_packed
    x = torch.randn(2, 32)
    assert torch.equal(group(x)[0], group.linears[0](x))


def test_packing_does_not_apply_outside_float32_on_the_cpu():
    (linear,) = linears((16, 8, False))
    group = LinearGroup(linear.to(torch.bfloat16))
    assert not group.pack() and not group.is_packed
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    assert torch.equal(group(x)[0], linear(x))


@pytest.mark.parametrize("rows", [1, 8, SMALL_BATCH])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("native", [True, False], ids=["library", "onednn"])
def test_transposed_gives_the_outputs_feature_major(rows, bias, native):
    group = LinearGroup(*linears((48, 40, bias), (48, 24, bias)))
    x = torch.randn(rows, 48)
    expected = torch.cat(plain(group, x), dim=1).t()
    assert group.pack(native=native)
    torch.testing.assert_close(group.transposed(x), expected, rtol=0, atol=1e-5)
    # The MLP hands the down projection a transposed view: strides must not matter.
    x_view = x.t().contiguous().t()
    torch.testing.assert_close(group.transposed(x_view), expected, rtol=0, atol=1e-5)


def test_transposed_declines_many_rows_and_an_unpacked_group():
    group = LinearGroup(*linears((32, 8, False)))
    assert group.transposed(torch.randn(2, 32)) is None  # not packed
    group.pack()
    assert group.transposed(torch.randn(SMALL_BATCH + 1, 32)) is None
    assert group.transposed(torch.randn(SMALL_BATCH, 32)) is not None


def test_packing_keeps_the_weights_as_views_of_one_matrix():
    group = LinearGroup(*linears((32, 8, True), (32, 4, False), (32, 4, False)))
    before = [linear.state_dict() for linear in group.linears]
    group.pack()
    after = [linear.state_dict() for linear in group.linears]
    for b, a in zip(before, after, strict=True):
        assert b.keys() == a.keys() and all(torch.equal(b[k], a[k]) for k in b)
    storages = {linear.weight.untyped_storage().data_ptr() for linear in group.linears}
    assert len(storages) == 1  # no second copy besides the packed one
    with torch.no_grad():
        group.linears[2].weight.zero_()  # a write through one view
    assert not group.is_packed and group.transposed(torch.randn(2, 32)) is None
