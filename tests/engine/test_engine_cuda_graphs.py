"""Steps replayed as CUDA graphs give the eager steps' logits (float32, TF32 off), on a tiny
model through turns whose decode batches change size (padded up to the buckets) and whose short
prefills run beside other threads' (the mixed shapes). CUDA only; the CPU runs the same mechanism with a stand-in for the
graph (tests/kernels/test_engine_captured_decode.py). On a GPU machine, without the web
packages: `python3 -m pytest --noconftest -p no:cacheprovider tests/engine/test_engine_cuda_graphs.py`.
"""

from __future__ import annotations

import pytest
import torch

from app.engine.runtime.llm_engine import LLMEngine
from tests.engine.engine_testing import (
    count_replays,
    play_changing_batches,
    random_model,
    tiny_config,
)


def cuda_engine(model, cuda_graphs: bool, max_num_seqs: int) -> LLMEngine:
    return LLMEngine(
        model,
        num_blocks=64,
        block_size=4,
        max_num_seqs=max_num_seqs,
        max_model_len=256,
        check_invariants=True,
        cuda_graphs=cuda_graphs,
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("max_num_seqs", [3, 4])  # decode buckets 1, 2, 3 and 1, 2, 4
def test_graph_replays_equal_eager_steps(max_num_seqs):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = random_model(tiny_config(num_heads=4, num_kv_heads=2, head_dim=16), seed=7).cuda()
    expected = play_changing_batches(cuda_engine(model, False, max_num_seqs))
    engine = cuda_engine(model, True, max_num_seqs)
    steps = engine.runner.step_cache
    assert steps is not None and steps.num_captures == len(steps.steps)
    assert steps.mixed_shapes  # short prefills beside decodes: captured too
    replays = count_replays(steps)
    got = play_changing_batches(engine)
    assert sorted({seqs for _, seqs, q in replays if q == 1}) == [1, 2, 3]
    assert [(tokens, seqs) for tokens, seqs, q in replays if q > 1] == [(21, 3), (5, 1), (12, 2)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


def test_a_cpu_model_refuses_cuda_graphs():
    with pytest.raises(ValueError, match="CUDA graphs need"):
        LLMEngine(random_model(), num_blocks=8, block_size=4, cuda_graphs=True)
