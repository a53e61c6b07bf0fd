"""After the engine's warm-up, a long-context turn asks the kernels for no variant it did not
compile (Triton compiles on a variant's first launch: 0.4-1.6 s in the middle of a turn).

Under TRITON_INTERPRET=1 nothing compiles, so Triton's compile hook
(`triton.knobs.runtime.jit_post_compile_hook`) never fires; the launchers' registry
(kernels/variants.py) records the variant of every launch instead. The device is faked as one
that splits the key range (a GPU of 4 SMs), so the split kernels and the combine kernel's split
counts are part of the turn.
"""

from __future__ import annotations

import pytest
import torch

import kernels.paged_attention as pa
from app.engine.network.attention import triton_backend
from app.engine.network.attention.triton_backend import TritonBackend
from app.engine.network.model import CausalLM, ModelConfig
from app.engine.runtime.llm_engine import LLMEngine
from app.engine.runtime.types import FinishEvent, SamplingParams
from kernels import variants

TARGET_PROGRAMS = 8  # 2 programs per SM on a 4-SM device


@pytest.fixture
def splitting_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        pa, "_choose_num_splits", lambda device, n, k: pa._num_splits_for(TARGET_PROGRAMS, n, k)
    )
    monkeypatch.setattr(
        triton_backend,
        "max_kv_splits",
        lambda device, hkv, k: pa.max_kv_splits_for(TARGET_PROGRAMS, hkv, k),
    )


def triton_engine() -> LLMEngine:
    config = ModelConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=128,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = CausalLM(config)
    model.init_rope("cpu", torch.float32)
    engine = LLMEngine(model.eval(), num_blocks=80, block_size=16, max_batch_tokens=256)
    engine.runner.attn = TritonBackend(engine.pool.layer_caches)
    return engine


def test_a_long_context_turn_launches_only_warmed_up_variants(splitting_device) -> None:
    engine = triton_engine()
    variants.reset()
    num_warmed = engine.warm_up()
    warmed = variants.used()
    assert num_warmed == len(warmed)
    # store_kv; per dtype: decode/prefill tiles x splits; combine kernels for 2..4 splits
    assert {v.kernel for v in warmed} == {"store_kv", "paged_attention", "combine_splits"}
    assert {v.constants["BLOCK_S"] for v in warmed if v.kernel == "combine_splits"} == {2, 4}

    variants.reset()
    prompt = [i % 100 + 1 for i in range(900)]
    engine.add_request("t", [], prompt, SamplingParams(max_tokens=6), first_turn=True)
    finished = False
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None
            finished |= any(isinstance(e, FinishEvent) for e in out.events)
    assert finished
    used = variants.used()
    assert used <= warmed, f"compiled during the turn: {sorted(map(str, used - warmed))}"
    assert any(v.constants.get("SPLIT_KV") for v in used)  # the turn did reach the split kernels
    assert any(v.kernel == "combine_splits" for v in used)
