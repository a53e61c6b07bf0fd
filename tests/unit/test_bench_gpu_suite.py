"""bench/gpu_suite.py (`make gpu-check`) without a GPU: it refuses in one line, and its engine
comparison tells equal runs from diverging ones. (Its CPU smoke run, with the Triton path under
the interpreter: tests/kernels/test_gpu_suite_script.py.)"""

from __future__ import annotations

import pytest
import torch

from bench import gpu_suite
from bench.gpu_suite import TurnResult, compare


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_non_zero(capsys, tmp_path):
    assert gpu_suite.main(["--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "no CUDA device" in captured.err


def test_the_cpu_device_goes_with_the_interpreter():
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--device", "cpu"])
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--steps", "kernels,nothing"])
    args = gpu_suite.parse_args(["--device", "cpu", "--interpret", "--steps", "engine"])
    assert args.interpret and args.steps == ["engine"]


def turn(ids: list[int], logits: list[list[float]], cached: int = 0) -> TurnResult:
    return TurnResult(ids, torch.tensor(logits), cached_tokens=cached, computed_tokens=5)


def test_compare_equal_runs():
    a = [[turn([1, 0], [[0.0, 2.0], [3.0, 1.0]])], [turn([1], [[0.0, 1.0]], cached=6)]]
    b = [[turn([1, 0], [[0.0, 2.0 + 1e-5], [3.0, 1.0]])], [turn([1], [[0.0, 1.0]], cached=6)]]
    result = compare(a, b)
    assert result.greedy_equal and result.counts_equal and result.first_divergence == ""
    assert result.max_abs_diff == pytest.approx(1e-5, rel=1e-2)


def test_compare_stops_at_a_divergence_and_names_it_with_the_reference_margin():
    got = [
        [turn([1, 1, 0], [[0.0, 2.0], [0.9, 1.0], [50.0, 0.0]])],
        [turn([0], [[99.0, 0.0]])],  # a later turn of the diverged thread: not compared
    ]
    want = [
        [turn([1, 0, 0], [[0.0, 2.0], [1.0, 0.9], [7.0, 0.0]])],
        [turn([1], [[0.0, 1.0]], cached=6)],
    ]
    result = compare(got, want)
    assert not result.greedy_equal
    assert result.counts_equal  # the diverged thread's later counts are not compared either
    # Rows up to the diverging token count, later ones (another context) do not.
    assert result.max_abs_diff == pytest.approx(0.1)
    assert result.first_divergence == "thread 0 turn 1 token 1 (reference top-2 margin 1.00e-01)"


def test_compare_sees_different_cache_counts():
    a = [[turn([1], [[0.0, 1.0]], cached=6)]]
    b = [[turn([1], [[0.0, 1.0]], cached=0)]]
    result = compare(a, b)
    assert result.greedy_equal and not result.counts_equal
