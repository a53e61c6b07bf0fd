"""LinearGroup's generic fused path (CUDA, or any dtype oneDNN does not pack): one F.linear over
the members' concatenated weight gives what the separate products give, keeps the state dict,
and is never served stale. Forced on the CPU with `fuse()` (float32) or by bf16 weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.engine.network.packed_linear import LinearGroup

SHAPES = [
    [(48, 48, False), (48, 16, False), (48, 16, False)],  # q, k, v
    [(48, 48, True), (48, 16, True), (48, 16, True)],  # Qwen2: biases
    [(48, 40, True), (48, 24, False)],  # a bias on one member only (gate/up shaped)
]


def group_of(shapes, dtype=torch.float32, seed: int = 0) -> tuple[LinearGroup, nn.Module]:
    torch.manual_seed(seed)
    holder = nn.ModuleList(nn.Linear(i, o, bias=b) for i, o, b in shapes).to(dtype)
    return LinearGroup(*holder), holder


def separate(group: LinearGroup, x: torch.Tensor) -> list[torch.Tensor]:
    return [linear(x) for linear in group.linears]


@pytest.mark.parametrize("rows", [1, 5, 67])
@pytest.mark.parametrize("shapes", SHAPES)
def test_fused_group_matches_separate_products(shapes, rows):
    group, _ = group_of(shapes)
    x = torch.randn(rows, shapes[0][0])
    with torch.inference_mode():
        expected = separate(group, x)
        assert group.fuse() and group.is_fused and not group.is_packed
        got = group(x)
    assert [t.shape for t in got] == [t.shape for t in expected]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shapes", SHAPES)
def test_bf16_on_the_cpu_takes_the_fused_path_through_pack(shapes):
    group, _ = group_of(shapes, torch.bfloat16)
    x = torch.randn(7, shapes[0][0], dtype=torch.bfloat16)
    expected = separate(group, x)
    assert not group.pack()  # no oneDNN packing for bf16 ...
    assert group.is_fused  # ... but one concatenated weight
    for g, e in zip(group(x), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1.6e-2, atol=1e-2)


def test_fusing_keeps_the_state_dict_and_makes_views():
    group, holder = group_of(SHAPES[1])
    before = {k: v.clone() for k, v in holder.state_dict().items()}
    group.fuse()
    after = holder.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    weight, bias = group._fused
    assert all(lin.weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
               for lin in group.linears)  # fmt: skip
    assert bias is not None and bias.shape == (80,)


def test_a_single_linear_is_not_fused():
    group, _ = group_of([(16, 8, False)], torch.bfloat16)
    assert not group.pack() and not group.fuse() and not group.is_fused


def test_a_weight_written_in_place_or_replaced_after_fusing_is_not_served_stale():
    group, _ = group_of(SHAPES[1])
    group.fuse()
    with torch.no_grad():
        group.linears[1].weight.mul_(2)
    assert group.is_stale and not group.is_fused
    x = torch.randn(3, 48)
    for g, e in zip(group(x), separate(group, x), strict=True):
        assert torch.equal(g, e)
    assert group.fuse() and group.is_fused  # fusing again serves the new weight
    torch.testing.assert_close(group(x)[1], separate(group, x)[1], rtol=0, atol=1e-5)

    group.linears[2].bias = nn.Parameter(torch.ones(16))
    assert group.is_stale and not group.is_fused
    assert torch.equal(group(x)[2], group.linears[2](x))
