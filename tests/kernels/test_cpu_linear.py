"""The CPU library's linear (kernels/cpu_linear.cpp) against F.linear: row counts that take every
tile (1-6 rows, tiles of 4 and 6, chunks of 48), widths that leave a block part empty, biases,
strided rows, an output written in place; and its argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.cpu_library import load_cpu_library
from kernels.cpu_linear import PackedLinear


@pytest.fixture(scope="module")
def library():
    built = load_cpu_library()
    assert built is not None, "the CPU library did not build (see the warning logged)"
    return built


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 9, 12, 47, 48, 49, 101])
@pytest.mark.parametrize(("in_features", "out_features"), [(16, 64), (40, 130), (96, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_is_f_linear(library, rows, in_features, out_features, bias):
    gen = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    x = torch.randn(rows, in_features, generator=gen)
    packed = PackedLinear.pack(library, weight, b)
    torch.testing.assert_close(packed(x), F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_strided_rows_and_an_output_in_place(library):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(70, 32, generator=gen)
    wide = torch.randn(5, 50, generator=gen)
    x = wide[:, 10:42]  # rows 50 floats apart
    packed = PackedLinear.pack(library, weight)
    out_wide = torch.full((5, 100), float("nan"))
    out = out_wide[:, 20:90]
    assert packed(x, out=out) is out
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert out_wide[:, :20].isnan().all() and out_wide[:, 90:].isnan().all()  # nothing else
    torch.testing.assert_close(packed(x.t().contiguous().t()), F.linear(x, weight))
    assert packed(x[:0]).shape == (0, 70)


def test_bad_arguments_are_refused(library):
    packed = PackedLinear.pack(library, torch.randn(8, 4))
    with pytest.raises(ValueError, match="5 features, the weight 4"):
        packed(torch.randn(2, 5))
    with pytest.raises(ValueError, match="float32"):
        packed(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="out must be"):
        packed(torch.randn(2, 4), out=torch.empty(2, 7))
    with pytest.raises(ValueError, match="2-d float32"):
        PackedLinear.pack(library, torch.randn(8, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bias"):
        PackedLinear.pack(library, torch.randn(8, 4), torch.randn(7))
